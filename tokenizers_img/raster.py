"""Raster-order decoding (LlamaGen baseline): one token per forward pass, with a static KV cache."""

from __future__ import annotations

import torch

from mmaccel.tokenizers_img.decoding import Decoded, decode
from mmaccel.tokenizers_img.gpt import GPT
from mmaccel.tokenizers_img.orders import raster_schedule
from mmaccel.tokenizers_img.sampling import SamplingConfig

__all__ = ["generate_raster"]


def generate_raster(
    model: GPT,
    cond: torch.Tensor,
    grid: tuple[int, int],
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Decoded:
    """Decode a ``grid = (H, W)`` token image in raster order: ``H * W`` forward passes.

    The row head acts as LlamaGen's next-token head. ``use_cache=False`` recomputes the whole
    prefix every step (reference for tests).
    """
    return decode(
        model,
        cond,
        raster_schedule(*grid),
        sampling,
        use_cache=use_cache,
        generator=generator,
        progress=progress,
    )
