"""Wan (``WanTransformer3DModel``): self-attention pieces for custom attention processors.

Mirrors diffusers' ``WanAttnProcessor``: q/k/v projections, RMS norms on q and k, the
interleaved rotary embedding on ``(B, S, H, D)`` tensors, attention through diffusers'
dispatch (so ``set_attention_backend`` chooses the kernel) and the output projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmaccel.runtime.adapters import projections

__all__ = [
    "BLOCKS",
    "ROTARY_ARG",
    "TEMB_ARG",
    "TRANSFORMERS",
    "apply_rotary",
    "attention",
    "blocks",
    "check_self_attention",
    "project_out",
    "project_qkv",
    "token_grid",
]

TRANSFORMERS = ("WanTransformer3DModel",)


def check_self_attention(transformer: torch.nn.Module, technique: str) -> None:
    """``NotImplementedError`` if a block's ``attn1`` has image (I2V) projections. Fused q/k/v
    projections (``fuse_qkv_projections()``) are supported: `project_qkv` uses them."""
    for i, block in enumerate(transformer.blocks):
        if getattr(block.attn1, "add_k_proj", None) is not None:
            raise NotImplementedError(
                f"{technique}: blocks[{i}].attn1 has image-conditioning projections "
                "(image-to-video Wan is not supported)"
            )


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's interleaved rotary embedding on ``(B, S, H, D)``, as in diffusers' ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def project_qkv(
    attn: Any,
    hidden_states: Tensor,
    kv_states: Tensor | None = None,
    rotary: tuple[Tensor, Tensor] | None = None,
    rotary_k: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normed, rotated ``(B, S, H, D)`` query (from ``hidden_states``) and key/value (from
    ``kv_states``, default the same tokens); ``rotary_k`` defaults to ``rotary``. Fused or not
    (`projections.qkv`)."""
    query, key, value = projections.qkv(attn, hidden_states, kv_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary is not None:
        query = apply_rotary(query, *rotary)
        key = apply_rotary(key, *(rotary if rotary_k is None else rotary_k))
    return query, key, value


def attention(attn: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
    """Dense attention on ``(B, S, H, D)`` tensors through diffusers' dispatch, with the backend
    ``set_attention_backend`` put on ``attn.processor`` (None: the active default) and the
    context-parallel config ``enable_parallelism`` put there (None: one process), as
    ``WanAttnProcessor`` passes them for self-attention."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = getattr(attn.processor, "_attention_backend", None)
    parallel = getattr(attn.processor, "_parallel_config", None)
    return dispatch_attention_fn(
        query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend, parallel_config=parallel
    )


def project_out(attn: Any, out: Tensor, like: Tensor) -> Tensor:
    """``(B, S, H, D)`` attention output -> ``(B, S, C)`` through ``to_out`` (dtype of ``like``)."""
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(like)))


# -- added for token density / SVG2 (block layout and token grid) ------------------------------

#: attribute holding the ``WanTransformerBlock``s, in order
BLOCKS = "blocks"
#: block argument carrying ``(cos, sin)``, each ``(1, N, 1, D)``
ROTARY_ARG = "rotary_emb"
#: block argument carrying the timestep embedding (per token in Wan 2.2: ``ndim == 4``)
TEMB_ARG = "temb"


def blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's blocks, bottom first."""
    return getattr(transformer, BLOCKS)


def token_grid(transformer: torch.nn.Module, hidden_states: Tensor) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the patch tokens for latents ``(B, C, F, H, W)``."""
    pt, ph, pw = transformer.config.patch_size
    _, _, f, h, w = hidden_states.shape
    return (f // pt, h // ph, w // pw)
