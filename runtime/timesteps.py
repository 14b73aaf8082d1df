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

__all__ = [
    "HostTimesteps",
    "TimestepCallback",
    "check_timestep_callback",
    "host_timestep_callback",
    "read_timestep",
    "step_position",
    "timestep_progress",
]

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
        if torch.compiler.is_exporting():
            raise NotImplementedError(
                f"torch.export of a model whose technique decides from {source}'s value is not implemented: "
                "the decision is taken on the host each forward, and an exported program cannot hold it. "
                "Export the unpatched model, or compile it with torch.compile instead"
            )
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


class HostTimesteps:
    """The scheduler's timesteps on the host: a timestep tensor becomes a Python float with no
    device read when it is a view of ``scheduler.timesteps`` (what pipelines pass: ``t``,
    ``t[None]``, ``t.expand(batch)``), found by its storage offset.

    ``scheduler.timesteps`` is read once per schedule (one device read per sampling run, when the
    pipeline has called ``set_timesteps``). :meth:`lookup` returns None for a tensor that is not
    such a view (a copy, or a batch of different timesteps); ``misses`` counts those, so a caller
    that falls back to reading the tensor is visible.
    """

    def __init__(self, scheduler: Any) -> None:
        if not hasattr(scheduler, "timesteps"):
            raise TypeError(f"scheduler must have `timesteps` (a diffusers scheduler), got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.misses = 0
        self._source: torch.Tensor | None = None
        self._values: list[float] = []

    def _refresh(self) -> torch.Tensor:
        steps = self.scheduler.timesteps
        if steps is not self._source:
            if not isinstance(steps, torch.Tensor) or steps.ndim != 1:
                raise ValueError("scheduler.timesteps is not a 1-D tensor; call scheduler.set_timesteps first")
            self._source, self._values = steps, [float(v) for v in steps.tolist()]  # once per schedule
        return steps

    def lookup(self, t: Any) -> float | None:
        """``t`` as a float: a number as is, a view of one scheduler timestep by its offset, else None."""
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return float(t)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None
        steps = self._refresh()
        same = (
            t.device == steps.device
            and t.dtype == steps.dtype
            and t.untyped_storage().data_ptr() == steps.untyped_storage().data_ptr()
            and all(s == 0 for s, n in zip(t.stride(), t.shape) if n > 1)  # one element, broadcast
        )
        offset, stride = (t.data_ptr() - steps.data_ptr()) // t.element_size(), steps.stride(0)
        if not same or stride == 0 or offset % stride or not 0 <= offset // stride < len(self._values):
            self.misses += 1
            return None
        return self._values[offset // stride]


def host_timestep_callback(pipe: Any) -> TimestepCallback:
    """``current_timestep_callback`` for a diffusers pipeline that reads no tensor value: returns
    ``pipe.current_timestep`` as a host float found by :class:`HostTimesteps` (or the tensor
    itself, read by :func:`read_timestep`, when it is not a view of ``pipe.scheduler.timesteps``)."""
    host = HostTimesteps(pipe.scheduler)

    def callback() -> Any:
        value = pipe.current_timestep
        found = host.lookup(value) if value is not None else None
        return value if found is None else found

    callback.host_timesteps = host  # type: ignore[attr-defined]
    return callback
