"""diffusers offloading on CPU for tests: the same hooks a GPU user installs, with both devices CPU."""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["OFFLOAD_KINDS", "enable_offload"]

OFFLOAD_KINDS = ("model", "group")


def enable_offload(pipe: Any, kind: str) -> None:
    """``kind="model"``: ``pipe.enable_model_cpu_offload``; ``"group"``: block-level group offload
    of ``pipe.transformer``, one block per group. Offloading to the same device warns; silenced."""
    if kind not in OFFLOAD_KINDS:
        raise ValueError(f"kind must be one of {OFFLOAD_KINDS}, got {kind!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "model":
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            pipe.transformer.enable_group_offload(
                onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                offload_type="block_level", num_blocks_per_group=1,
            )  # fmt: skip
