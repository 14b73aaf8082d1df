"""DiT and PixArt-alpha (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``): image
transformers built from diffusers' ``BasicTransformerBlock`` in ``transformer_blocks``.

What techniques need to know about them: which classes belong to the family, where the blocks
are and the token grid of an input (patchified latents, one frame).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCKS", "TRANSFORMERS", "blocks", "token_grid"]

TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
#: attribute holding the ``BasicTransformerBlock``s, in order
BLOCKS = "transformer_blocks"


def blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's blocks, bottom first."""
    return getattr(transformer, BLOCKS)


def token_grid(transformer: torch.nn.Module, hidden_states: Tensor) -> tuple[int, int, int]:
    """``(1, height, width)`` of the patch tokens for latents ``(B, C, H, W)``."""
    p = transformer.config.patch_size
    return (1, hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
