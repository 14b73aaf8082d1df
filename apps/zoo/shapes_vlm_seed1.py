"""Shapes VLM, seed 1: the ``shapes-vlm`` recipe (:mod:`mmaccel.apps.zoo.shapes_vlm`) trained
from another seed, so that a token-pruning rule is judged on two models, not tuned to one.

    from mmaccel.apps.zoo.shapes_vlm_seed1 import load
    model, processor = load()
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmaccel.apps.zoo import shapes_vlm
from mmaccel.testing import TinyVLM

__all__ = ["NAME", "SEED", "load", "train"]

NAME = "shapes-vlm-seed1"
#: the seed of the committed weights (``mmaccel zoo train shapes-vlm-seed1 --seed 1``)
SEED = 1


def train(output: Path, *, seed: int = SEED, progress: bool = True) -> dict[str, float | int | str]:
    """``shapes-vlm``'s training recipe, unchanged, from ``seed``; the card names this entry."""
    return shapes_vlm.train(output, seed=seed, progress=progress, name=NAME)


def load(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TinyVLM:
    """The committed seed-1 Shapes VLM (or the one saved at ``path``) as ``(model, processor)``."""
    from mmaccel.apps.zoo import zoo_path

    return shapes_vlm.load(zoo_path(NAME) if path is None else path, device=device, dtype=dtype)
