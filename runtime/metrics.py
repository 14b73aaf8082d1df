"""Fidelity metrics against a dense/reference run."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["psnr", "relative_l2"]


def psnr(x: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, data_range: float | None = None) -> float:
    """PSNR of ``x`` against ``ref`` in dB (``inf`` when identical).

    ``data_range`` is the peak value (e.g. 1.0 for images in [0, 1], 2.0 for [-1, 1]); ``None``
    uses the reference's peak-to-peak range, for latents and model outputs without a fixed scale.
    """
    x64 = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).double()
    ref64 = torch.as_tensor(np.asarray(ref) if isinstance(ref, np.ndarray) else ref).double()
    if x64.shape != ref64.shape:
        raise ValueError(f"x and ref must have the same shape, got {tuple(x64.shape)} and {tuple(ref64.shape)}")
    mse = float(((x64 - ref64) ** 2).mean())
    peak = float(ref64.max() - ref64.min()) if data_range is None else float(data_range)
    if peak <= 0:
        raise ValueError(f"data_range must be > 0, got {peak}")
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64."""
    x64, ref64 = x.double(), ref.double()
    return float((x64 - ref64).norm() / ref64.norm())
