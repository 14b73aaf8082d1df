"""Gradient checkpointing of a patched transformer: a refusal where a recompute cannot take its
forward's decisions.

diffusers checkpoints a transformer's blocks when ``enable_gradient_checkpointing()`` was called
and gradients are enabled: backward recomputes each block. A technique that decides per forward
and does not keep that decision for the recompute (SVG2's k-means clustering) would recompute
other tensors: torch's ``CheckpointError`` at best, a wrong gradient at worst. Such a technique
calls :func:`refuse_checkpointed_gradients` at apply time, and the forward that would be
recomputed raises ``NotImplementedError`` before any backward runs. A technique that keeps its
decisions (token density keeps each forward's plan for its recompute) asks
:func:`checkpointing_with_gradients` instead.
"""

from __future__ import annotations

from typing import Any

import torch

from mmaccel.runtime.patching import PatchHandle

__all__ = ["checkpointing_with_gradients", "refuse_checkpointed_gradients"]


def checkpointing_with_gradients(transformer: torch.nn.Module) -> bool:
    """Whether a forward now would checkpoint ``transformer``'s blocks (diffusers' own test:
    ``torch.is_grad_enabled() and self.gradient_checkpointing``)."""
    return torch.is_grad_enabled() and bool(getattr(transformer, "gradient_checkpointing", False))


def refuse_checkpointed_gradients(
    handle: PatchHandle, transformer: torch.nn.Module, technique: str, reason: str
) -> None:
    """Make a forward of ``transformer`` with gradient checkpointing and gradients enabled raise
    ``NotImplementedError`` naming ``technique`` and ``reason``, before the forward runs. The hook
    goes with ``handle.remove()``."""

    def before(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if checkpointing_with_gradients(module):
            raise NotImplementedError(
                f"{technique} under gradient checkpointing with gradients enabled is not implemented: {reason}. "
                "Call transformer.disable_gradient_checkpointing(), or run under torch.no_grad()"
            )

    handle.add_torch_hook(transformer.register_forward_pre_hook(before))
