"""Gradient checkpointing of a patched transformer.

diffusers checkpoints a transformer's blocks when ``enable_gradient_checkpointing()`` was called
and gradients are enabled: backward recomputes each block. A technique that decides per forward
must let the recompute take the forward's decision, or torch raises ``CheckpointError`` (at best):
token density keeps each forward's plan for its recompute, SVG2 keeps each layer's clustering.
:func:`checkpointing_with_gradients` tells a technique that a forward will be recomputed.
"""

from __future__ import annotations

import torch

__all__ = ["checkpointing_with_gradients"]


def checkpointing_with_gradients(transformer: torch.nn.Module) -> bool:
    """Whether a forward now would checkpoint ``transformer``'s blocks (diffusers' own test:
    ``torch.is_grad_enabled() and self.gradient_checkpointing``)."""
    return torch.is_grad_enabled() and bool(getattr(transformer, "gradient_checkpointing", False))
