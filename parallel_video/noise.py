"""Shared seed scheme: the initial noise of latent frame ``f`` depends only on ``(seed, f)``.

Every rank draws the noise of its own clip, and the whole video's noise is the same whatever the
number of ranks or the clip boundaries, so a 1-rank and an N-rank run start from the same latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["frame_noise", "frame_seed"]

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads nearby (seed, frame) pairs apart
_MASK = (1 << 63) - 1


def frame_seed(seed: int, frame: int) -> int:
    """The generator seed of latent frame ``frame`` in a video seeded with ``seed``."""
    return ((seed * _MIX) ^ (frame * 0x632BE59BD9B4E019 + 1)) & _MASK


def frame_noise(
    seed: int,
    frames: Sequence[int],
    frame_shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise for the latent frames ``frames``: shape ``(1, C, len(frames), H, W)``.

    ``frame_shape`` is ``(C, H, W)``. Drawn on the CPU (so every device gets the same numbers),
    then moved to ``device``.
    """
    channels, height, width = frame_shape
    planes = [
        torch.randn(
            channels, height, width, generator=torch.Generator("cpu").manual_seed(frame_seed(seed, f))
        )
        for f in frames
    ]
    return torch.stack(planes, dim=1).unsqueeze(0).to(device=device, dtype=dtype)
