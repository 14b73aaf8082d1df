"""Flux (``FluxTransformer2DModel``): dual-stream then single-stream blocks with joint text+image
attention, text tokens first, a 2-D RoPE over ``[text; image]`` position ids.

What techniques need to know: where the blocks are, which block argument holds the RoPE and the
text tokens, where the image tokens are in a block's output, and the image token grid, which Flux
does not carry in its inputs' shapes (``hidden_states`` are packed ``(B, h w, C)``): it is read
from ``img_ids`` (``(h w, 3)``, rows ``[0, row, col]``), once per ``img_ids`` tensor.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = [
    "DUAL_BLOCKS",
    "OUTPUT_INDEX",
    "ROTARY_ARG",
    "SINGLE_BLOCKS",
    "TEXT_ARG",
    "TRANSFORMERS",
    "blocks",
    "token_count",
    "token_grid",
]

TRANSFORMERS = ("FluxTransformer2DModel",)
#: attributes holding the dual-stream (``FluxTransformerBlock``) and single-stream
#: (``FluxSingleTransformerBlock``) blocks; the dual-stream ones run first
DUAL_BLOCKS = "transformer_blocks"
SINGLE_BLOCKS = "single_transformer_blocks"
#: block argument carrying ``(cos, sin)``, each ``(N_text + N_image, D)``: text rows first
ROTARY_ARG = "image_rotary_emb"
#: block argument carrying the text tokens (their count is the RoPE's text rows)
TEXT_ARG = "encoder_hidden_states"
#: blocks return ``(encoder_hidden_states, hidden_states)``: the image tokens are element 1
OUTPUT_INDEX = 1

_GRIDS: dict[int, tuple[weakref.ref, tuple[int, int, int]]] = {}


def blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block, bottom first: the dual-stream blocks, then the single-stream ones."""
    return [*getattr(transformer, DUAL_BLOCKS), *getattr(transformer, SINGLE_BLOCKS)]


def token_count(hidden_states: Tensor) -> int:
    """The image tokens of a forward: ``hidden_states`` is ``(batch, tokens, channels)``, packed."""
    return hidden_states.shape[1]


def token_grid(transformer: torch.nn.Module, hidden_states: Tensor, img_ids: Tensor) -> tuple[int, int, int]:
    """``(1, rows, cols)`` of the image tokens: the last row of ``img_ids`` (raster order, as
    ``FluxPipeline._prepare_latent_image_ids`` writes it) plus one. Read on the host once per
    ``img_ids`` tensor (a pipeline passes the same one at every step); ``ValueError`` unless
    ``rows * cols`` is the token count."""
    cached = _GRIDS.get(id(img_ids))
    if cached is not None and cached[0]() is img_ids:
        grid = cached[1]
    else:
        ids = img_ids[-1] if img_ids.ndim == 2 else img_ids[0, -1]
        row, col = (int(v) for v in ids[1:3].tolist())
        grid = (1, row + 1, col + 1)
        _GRIDS.clear()  # one live img_ids at a time is the pipeline's pattern
        _GRIDS[id(img_ids)] = (weakref.ref(img_ids), grid)
    if grid[1] * grid[2] != hidden_states.shape[1]:
        raise ValueError(
            f"img_ids end at row {grid[1] - 1}, column {grid[2] - 1}: a {grid[1]}x{grid[2]} grid, but "
            f"hidden_states has {hidden_states.shape[1]} image tokens (token density needs raster-order img_ids)"
        )
    return grid
