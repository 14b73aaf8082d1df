"""Next-neighbour autoregressive decoding (He et al., "Neighboring Autoregressive Modeling for
Efficient Visual Generation", 2025).

Starting from the top-left token, step ``c`` decodes every ``(h, w)`` with ``h + w = c`` in one
forward pass: ``H + W - 1`` forwards instead of ``H * W`` (24 x 24: 47 vs 576). The fed tokens
see all tokens on diagonals <= their own (proximity mask) and are written into the KV cache at
their raster positions. A target's logits come from its left neighbour's row head, the column
head of the one above, or the mean of both. Unlike the reference, any ``H x W`` grid works.
"""

from __future__ import annotations

import torch

from mmaccel.tokenizers_img.decoding import Decoded, decode
from mmaccel.tokenizers_img.gpt import GPT
from mmaccel.tokenizers_img.orders import nar_schedule
from mmaccel.tokenizers_img.sampling import SamplingConfig

__all__ = ["generate_nar"]


def generate_nar(
    model: GPT,
    cond: torch.Tensor,
    grid: tuple[int, int],
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Decoded:
    """Decode a ``grid = (H, W)`` token image diagonal by diagonal (needs a NAR model: ``column_blocks >= 1``).

    ``use_cache=False`` recomputes every fed token each step in the same order (reference for tests).
    """
    return decode(
        model,
        cond,
        nar_schedule(*grid),
        sampling,
        use_cache=use_cache,
        generator=generator,
        progress=progress,
    )
