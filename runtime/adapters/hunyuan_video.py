"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream then single-stream blocks with
joint video+text attention, video tokens first.

Mirrors diffusers' ``HunyuanVideoAttnProcessor2_0``: q/k/v of the video tokens (RMS-normed,
rotated by the 3-D RoPE of the video tokens), of the text tokens (``add_*_proj`` in the
dual-stream blocks, the same projections in the single-stream ones, never rotated), one joint
``[video; text]`` sequence, attention through diffusers' dispatch with the key mask the transformer
builds from ``encoder_attention_mask`` (``(B, 1, 1, S)``, padded text keys False), the output
split back. Tensors are ``(B, S, H, D)``, as diffusers' dispatch takes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmaccel.runtime.adapters import projections

__all__ = [
    "DUAL_BLOCKS",
    "FIRST_FRAME_ARG",
    "MASK_ARG",
    "ROTARY_ARGS",
    "SINGLE_BLOCKS",
    "TRANSFORMERS",
    "attention",
    "blocks",
    "first_frame_split",
    "project_out",
    "project_qkv",
    "token_grid",
]

TRANSFORMERS = ("HunyuanVideoTransformer3DModel",)
#: attributes holding the dual-stream (``HunyuanVideoTransformerBlock``) and single-stream
#: (``HunyuanVideoSingleTransformerBlock``) blocks; the dual-stream ones run first
DUAL_BLOCKS = "transformer_blocks"
SINGLE_BLOCKS = "single_transformer_blocks"
#: block argument carrying the video tokens' ``(cos, sin)``, each ``(N, D)``: ``freqs_cis`` in the
#: dual-stream blocks, ``image_rotary_emb`` in the single-stream ones
ROTARY_ARGS = ("freqs_cis", "image_rotary_emb")
#: token-replace blocks' argument: how many leading video tokens are the first latent frame's
FIRST_FRAME_ARG = "num_tokens"
#: block argument carrying the joint key mask ``(B, 1, 1, N_video + N_text)`` (bool)
MASK_ARG = "attention_mask"


def blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block, bottom first: the dual-stream blocks, then the single-stream ones."""
    return [*getattr(transformer, DUAL_BLOCKS), *getattr(transformer, SINGLE_BLOCKS)]


def first_frame_split(transformer: torch.nn.Module) -> bool:
    """Whether the blocks split the first frame's tokens by count: image-to-video
    ``image_condition_type="token_replace"`` gives the first ``num_tokens`` video tokens (the first
    latent frame, `FIRST_FRAME_ARG`) their own modulation."""
    return transformer.config.image_condition_type == "token_replace"


def token_grid(transformer: torch.nn.Module, hidden_states: Tensor) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the video tokens for latents ``(B, C, F, H, W)``."""
    p, pt = transformer.config.patch_size, transformer.config.patch_size_t
    _, _, f, h, w = hidden_states.shape
    return (f // pt, h // p, w // p)


def project_qkv(
    attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, rotary: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Joint ``[video; text]`` query, key, value ``(B, S, H, D)``: normed, the video part rotated;
    the video (single-stream: joint) projections fused or not (`projections.qkv`)."""
    from diffusers.models.embeddings import apply_rotary_emb

    dual = attn.add_q_proj is not None
    video = hidden_states if dual else torch.cat([hidden_states, encoder_hidden_states], dim=1)
    n = hidden_states.shape[1]
    qkv = [x.unflatten(2, (attn.heads, -1)) for x in projections.qkv(attn, video)]
    if attn.norm_q is not None:
        qkv[0] = attn.norm_q(qkv[0])
    if attn.norm_k is not None:
        qkv[1] = attn.norm_k(qkv[1])
    if rotary is not None:
        for i in (0, 1):
            qkv[i] = torch.cat([apply_rotary_emb(qkv[i][:, :n], rotary, sequence_dim=1), qkv[i][:, n:]], dim=1)
    if dual:
        text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]  # fmt: skip
        if attn.norm_added_q is not None:
            text[0] = attn.norm_added_q(text[0])
        if attn.norm_added_k is not None:
            text[1] = attn.norm_added_k(text[1])
        qkv = [torch.cat([v, t], dim=1) for v, t in zip(qkv, text)]
    return qkv[0], qkv[1], qkv[2]


def attention(attn: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
    """Dense attention on ``(B, S, H, D)`` through diffusers' dispatch, with the backend
    ``set_attention_backend`` put on ``attn.processor`` (None: the active default)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = getattr(attn.processor, "_attention_backend", None)
    return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend)


def project_out(attn: Any, out: Tensor, text_len: int) -> tuple[Tensor, Tensor]:
    """``(B, S, H, D)`` joint output -> ``(video, text)`` through ``to_out`` / ``to_add_out`` where
    the block has them (the single-stream blocks project later, in ``proj_out``)."""
    out = out.flatten(2, 3)
    video, text = out[:, :-text_len], out[:, -text_len:]
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text)
    return video, text
