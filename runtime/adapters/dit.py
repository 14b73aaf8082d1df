"""DiT and PixArt-alpha (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``): image
transformers built from diffusers' ``BasicTransformerBlock`` in ``transformer_blocks``.

What techniques need to know about them: which classes belong to the family, where the blocks
are and the token grid of an input (patchified latents, one frame).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmaccel.runtime.adapters import projections

__all__ = ["BLOCKS", "TRANSFORMERS", "blocks", "split_attention", "token_grid"]

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


def split_attention(attn: Any, forward: Callable[..., Tensor], hidden_states: Tensor, **kwargs: Any) -> Tensor:
    """A self-attention ``attn`` run with queries from ``hidden_states`` and keys/values from
    ``kwargs["encoder_hidden_states"]``: its own ``forward``, or, once ``fuse_qkv_projections()``
    fused it (PixArt's ``FusedAttnProcessor2_0`` then wants a ``to_kv`` that a fused
    self-attention lacks), diffusers' ``AttnProcessor2_0`` on the ``to_q`` / ``to_k`` / ``to_v``
    that the fused weights were copied from and that ``unfuse_qkv_projections()`` returns to."""
    if projections.is_fused(attn):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, hidden_states, **kwargs)
    return forward(hidden_states, **kwargs)
