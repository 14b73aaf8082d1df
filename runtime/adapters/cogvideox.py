"""CogVideoX (``CogVideoXTransformer3DModel``): joint text+video self-attention pieces.

Mirrors diffusers' ``CogVideoXAttnProcessor2_0``: the text tokens come first in one joint
sequence, q/k/v are projected from it, optional LayerNorms on q and k, the rotary embedding is
applied to the video tokens only, attention runs through diffusers' dispatch (so
``set_attention_backend`` chooses the kernel) and the output is split back into video and text.
Tensors here are ``(B, S, H, D)``, as diffusers' dispatch takes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmaccel.runtime.adapters import projections
from mmaccel.runtime.patching import PatchHandle

__all__ = [
    "BLOCKS",
    "ROTARY_ARG",
    "TRANSFORMERS",
    "apply_rotary",
    "attention",
    "blocks",
    "keep_processors_on_fusion",
    "project_out",
    "project_qkv",
    "token_grid",
]

TRANSFORMERS = ("CogVideoXTransformer3DModel",)
#: attribute holding the ``CogVideoXBlock``s, in order
BLOCKS = "transformer_blocks"
#: block argument carrying the video tokens' ``(cos, sin)``, each ``(N, D)``
ROTARY_ARG = "image_rotary_emb"


def blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's blocks, bottom first."""
    return getattr(transformer, BLOCKS)


def token_grid(transformer: torch.nn.Module, hidden_states: Tensor) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the video tokens for latents ``(B, F, C, H, W)`` (CogVideoX
    1.5 pads the frames to a multiple of ``patch_size_t``)."""
    cfg = transformer.config
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    _, f, _, h, w = hidden_states.shape
    return ((f + (-f) % pt) // pt, h // p, w // p)


def apply_rotary(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """CogVideoX's rotary embedding (pairs interleaved, computed in float32) on ``(B, S, H, D)``."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


def project_qkv(
    attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, rotary: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Joint ``[text; video]`` query, key, value as ``(B, S, H, D)``, normed, the video part rotated;
    fused or not (`projections.qkv`)."""
    text_len = encoder_hidden_states.shape[1]
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in projections.qkv(attn, joint))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rotary is not None:
        query = torch.cat([query[:, :text_len], apply_rotary(query[:, text_len:], rotary)], dim=1)
        if not attn.is_cross_attention:
            key = torch.cat([key[:, :text_len], apply_rotary(key[:, text_len:], rotary)], dim=1)
    return query, key, value


def attention(attn: Any, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Dense attention on ``(B, S, H, D)`` through diffusers' dispatch, with the backend
    ``set_attention_backend`` put on ``attn.processor`` (None: the active default)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = getattr(attn.processor, "_attention_backend", None)
    return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, backend=backend)


def project_out(attn: Any, out: Tensor, text_len: int) -> tuple[Tensor, Tensor]:
    """``(B, S, H, D)`` joint attention output -> ``(video, text)`` hidden states through ``to_out``."""
    out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))
    text, video = out.split([text_len, out.shape[1] - text_len], dim=1)
    return video, text


def keep_processors_on_fusion(handle: PatchHandle, transformer: torch.nn.Module) -> None:
    """While ``handle`` is active, ``transformer.fuse_qkv_projections()`` fuses the projections
    only and ``unfuse_qkv_projections()`` changes nothing. CogVideoX's own methods put
    ``FusedCogVideoXAttnProcessor2_0`` on every attention / put back the processors saved when
    fusing, which would silently take a technique's processors out; the technique projects
    through `projections.qkv`, fused or not, and diffusers' own unfuse leaves the fused weights in
    place too. ``handle.remove()`` gives the class's methods back."""
    from diffusers.models.attention_processor import Attention

    def fuse_qkv_projections() -> None:
        for module in transformer.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)

    def unfuse_qkv_projections() -> None:
        return None

    handle.set_attr(transformer, "fuse_qkv_projections", fuse_qkv_projections)
    handle.set_attr(transformer, "unfuse_qkv_projections", unfuse_qkv_projections)
