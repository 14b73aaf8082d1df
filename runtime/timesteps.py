"""One timestep convention for every denoising technique.

A technique that changes with denoising time takes ``current_timestep_callback``: a callable
returning the **scheduler's timestep** of the step being computed, as diffusers' pyramid
attention broadcast does (``current_timestep_callback=lambda: pipe.current_timestep``). Without
a callback the transformer's own ``timestep`` argument is read. :func:`read_timestep` validates
the value (a value that cannot be a timestep is an error, never a silent dense run) and
:func:`timestep_progress` / :func:`step_position` turn it into denoising progress.

Per-sample timesteps (a training batch, diffusion forcing) and per-token timesteps (Wan 2.2
TI2V-5B's image-to-video, whose first frame is at timestep 0) are one decision for the whole
forward, taken by the **noisiest** element: the largest timestep. Every rule here reduces compute
least at high noise (dense steps first, reduction later), so the noisiest sample decides
conservatively: no sample is reduced more than it would be alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["TimestepCallback", "check_timestep_callback", "read_timestep", "step_position", "timestep_progress"]

#: ``() -> the scheduler's current timestep`` (a number, or a tensor: its largest element decides).
TimestepCallback = Callable[[], Any]


def check_timestep_callback(callback: Any, name: str = "current_timestep_callback") -> None:
    """``TypeError`` unless ``callback`` is None or callable (checked at apply time)."""
    if callback is not None and not callable(callback):
        raise TypeError(
            f"{name} must be a callable returning the scheduler's timestep "
            f"(e.g. lambda: pipe.current_timestep), got {type(callback).__name__}"
        )


def read_timestep(value: Any, num_train_timesteps: int = 1000, source: str = "current_timestep_callback") -> float:
    """The timestep ``value`` as a float in ``[0, num_train_timesteps]``; ``ValueError`` otherwise.

    Accepts a Python number or a tensor of any shape (per sample or per token): a tensor's
    largest element is the timestep (the noisiest sample decides, module docstring). Reading a
    tensor is one host read. ``source`` names where the value came from, for the error message.
    """
    if value is None:
        raise ValueError(
            f"{source} returned None; it must return the scheduler's timestep "
            "(pipe.current_timestep is None outside the denoising loop)"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{source} must return a number or a tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            raise ValueError(f"{source} returned an empty tensor")
        flat = value.detach().flatten().float()
        if flat.numel() > 1:  # one host read of (min, max): every element must be a timestep
            low, value = torch.stack(torch.aminmax(flat)).tolist()
            if not math.isfinite(low) or low < 0.0:
                raise ValueError(f"{source} returned a tensor holding {low!r}, which is not a timestep")
        else:
            value = float(flat[0])
    t = float(value)
    if not math.isfinite(t) or not 0.0 <= t <= num_train_timesteps:
        raise ValueError(
            f"{source} returned {t!r}, which is not a timestep in [0, {num_train_timesteps}] "
            "(it must be the scheduler's timestep, not denoising progress)"
        )
    return t


def timestep_progress(t: float, num_train_timesteps: int = 1000) -> float:
    """Denoising progress of timestep ``t``: 0 at pure noise (``t = num_train_timesteps``), 1 at the end."""
    return min(1.0, max(0.0, 1.0 - t / num_train_timesteps))


def step_position(t: float, timesteps: Sequence[float] | torch.Tensor) -> tuple[int, int]:
    """``(index, count)`` of timestep ``t`` in a scheduler's ``timesteps`` (step-counted rules)."""
    steps = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    hits = torch.nonzero(torch.isclose(steps, torch.tensor(t, dtype=torch.float64), rtol=0, atol=1e-3)).flatten()
    if hits.numel() == 0:
        raise ValueError(f"timestep {t} is not one of the scheduler's timesteps {steps.tolist()[:8]}...")
    return int(hits[0]), steps.numel()
