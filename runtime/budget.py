"""Token budgets: how many tokens a stage keeps, and how a budget is split.

Every mmaccel technique decides which tokens deserve compute. This module holds the
shared arithmetic: a validated :class:`TokenBudget`, exact integer :func:`allocate`
(largest-remainder rounding with capacities), :func:`top_p_mask` over scores, and
density schedules mapping denoising progress to a keep ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "TokenBudget",
    "allocate",
    "top_p_mask",
    "DensitySchedule",
    "ConstantSchedule",
    "LinearSchedule",
    "StepSchedule",
    "CosineSchedule",
    "monotone_pieces",
]


def _check_ratio(name: str, value: float, *, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok or math.isnan(value):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


@dataclass(frozen=True)
class TokenBudget:
    """How many of ``n`` tokens to keep: a ``ratio`` in (0, 1] or an absolute ``count`` >= 1.

    Exactly one of the two is given. :meth:`resolve` turns it into an int in [1, n].
    """

    ratio: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.count is None):
            raise ValueError("TokenBudget needs exactly one of `ratio` or `count`")
        if self.ratio is not None:
            _check_ratio("ratio", self.ratio)
        if self.count is not None:
            if isinstance(self.count, bool) or not isinstance(self.count, int):
                raise TypeError(f"count must be an int >= 1, got {type(self.count).__name__}")
            if self.count < 1:
                raise ValueError(f"count must be >= 1, got {self.count}")

    def resolve(self, n: int) -> int:
        """Number of tokens to keep out of ``n`` (n >= 1); rounds a ratio to nearest, at least 1."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if self.count is not None:
            return min(self.count, n)
        return max(1, min(n, round(self.ratio * n)))

    @property
    def is_full(self) -> bool:
        """True when the budget keeps every token whatever ``n`` is."""
        return self.ratio == 1.0


def allocate(total: int, weights: torch.Tensor, capacity: torch.Tensor) -> torch.LongTensor:
    """Split ``total`` tokens over groups in proportion to ``weights``, capped by ``capacity``.

    Returns integers that sum to ``min(total, capacity.sum())`` and never exceed a group's
    capacity. Rounding is largest-remainder; a group's share above its capacity is
    redistributed over the others in proportion to their weights. Groups whose weights are
    all zero are filled uniformly (by capacity) once weighted groups are full; if every weight
    is zero the split is uniform. Negative or NaN weights raise ``ValueError``.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    capacity = torch.as_tensor(capacity).flatten()
    if capacity.is_floating_point() and not torch.equal(capacity, capacity.round()):
        raise ValueError("capacity must hold integers")
    capacity = capacity.to(torch.long)
    if weights.numel() != capacity.numel():
        raise ValueError(
            f"weights and capacity must have the same length, got {weights.numel()} and {capacity.numel()}"
        )
    if weights.numel() == 0:
        raise ValueError("weights must not be empty")
    if torch.isnan(weights).any() or torch.isinf(weights).any():
        raise ValueError("weights must be finite (got NaN or inf)")
    if (weights < 0).any():
        raise ValueError("weights must be non-negative")
    if (capacity < 0).any():
        raise ValueError("capacity must be non-negative")

    out = torch.zeros_like(capacity)
    remaining = min(total, int(capacity.sum()))
    # Weighted groups first; zero-weight groups only absorb what weighted ones cannot hold.
    for pool_weights in (weights, capacity.to(torch.float64)):
        open_ = (out < capacity) & (pool_weights > 0)
        while remaining > 0 and open_.any():
            w = torch.where(open_, pool_weights, torch.zeros_like(pool_weights))
            share = w / w.sum() * remaining
            room = (capacity - out).to(torch.float64)
            full = open_ & (share >= room)
            if full.any():  # cap the overflowing groups, redistribute the rest
                remaining -= int((capacity - out)[full].sum())
                out[full] = capacity[full]
                open_ &= ~full
                continue
            base = share.floor().to(torch.long)
            rest = remaining - int(base.sum())
            frac = torch.where(open_, share - base.to(torch.float64), torch.full_like(share, -1.0))
            # Largest remainders get one more; ties go to the lower index (stable sort).
            order = torch.sort(frac, dim=0, descending=True, stable=True).indices[:rest]
            base[order] += 1
            out += base
            remaining = 0
    return out


def top_p_mask(scores: torch.Tensor, p: float, min_keep: int = 1, *, probs: bool = False) -> torch.Tensor:
    """Boolean mask keeping, per row (last dim), the smallest top set whose mass reaches ``p``.

    ``scores`` are logits (softmaxed here) unless ``probs=True`` (non-negative, normalised per
    row here). The element whose cumulative mass crosses ``p`` is kept, and at least
    ``min_keep`` elements per row are kept. ``p = 1`` keeps every element with non-zero mass
    (and at least ``min_keep``).

    NaN scores raise ``ValueError``, and so do infinite ones, except ``-inf`` logits (masked
    entries, as top-k leaves them) in a row that has at least one finite logit.
    """
    _check_ratio("p", p)
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an int >= 1, got {min_keep!r}")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim == 0:
        raise ValueError("scores must have at least one dimension")
    if scores.is_floating_point():
        nan = int(torch.isnan(scores).sum())
        if nan:
            raise ValueError(f"scores must not be NaN; got {nan} NaN value(s) of {scores.numel()}")
        if probs and torch.isinf(scores).any():
            raise ValueError("probs=True needs finite scores; got inf")
        if not probs:
            if torch.isposinf(scores).any():
                raise ValueError("scores (logits) must be finite or -inf (masked); got +inf")
            if scores.shape[-1] and torch.isneginf(scores).all(-1).any():
                raise ValueError("a row of scores (logits) is all -inf: nothing can be kept")
    if probs:
        if (scores < 0).any():
            raise ValueError("probs=True needs non-negative scores")
        mass = scores.double() / scores.double().sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        mass = scores.double().softmax(-1)
    sorted_mass, order = mass.sort(dim=-1, descending=True, stable=True)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass strictly before each element
    keep_sorted = before < p - 1e-6  # tolerance for float32 inputs that sum to p
    keep_sorted[..., : min(min_keep, scores.shape[-1])] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@runtime_checkable
class DensitySchedule(Protocol):
    """Maps denoising progress in [0, 1] (0 = first step, pure noise) to a keep ratio in (0, 1]."""

    def __call__(self, progress: float) -> float: ...


def _check_progress(progress: float) -> float:
    if not 0.0 <= progress <= 1.0 or math.isnan(progress):
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    return float(progress)


@dataclass(frozen=True)
class ConstantSchedule:
    """The same keep ratio at every step."""

    ratio: float = 1.0

    def __post_init__(self) -> None:
        _check_ratio("ratio", self.ratio)

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        return self.ratio


@dataclass(frozen=True)
class LinearSchedule:
    """Linear from ``start`` (progress 0) to ``end`` (progress 1)."""

    start: float = 0.5
    end: float = 1.0

    def __post_init__(self) -> None:
        _check_ratio("start", self.start)
        _check_ratio("end", self.end)

    def __call__(self, progress: float) -> float:
        t = _check_progress(progress)
        return self.start + (self.end - self.start) * t


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine ease from ``start`` (progress 0) to ``end`` (progress 1)."""

    start: float = 0.5
    end: float = 1.0

    def __post_init__(self) -> None:
        _check_ratio("start", self.start)
        _check_ratio("end", self.end)

    def __call__(self, progress: float) -> float:
        t = _check_progress(progress)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class StepSchedule:
    """Piecewise constant: ``ratios[i]`` from progress ``boundaries[i-1]`` (inclusive) on.

    ``boundaries`` are strictly increasing in (0, 1) and ``len(ratios) == len(boundaries) + 1``.
    Example: ``StepSchedule(boundaries=(0.5,), ratios=(0.25, 1.0))`` keeps 25% of tokens in the
    first half of denoising and all of them after.
    """

    boundaries: tuple[float, ...] = (0.5,)
    ratios: tuple[float, ...] = (0.5, 1.0)

    def __post_init__(self) -> None:
        if len(self.ratios) != len(self.boundaries) + 1:
            raise ValueError(
                f"ratios must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, got {len(self.ratios)}"
            )
        for i, r in enumerate(self.ratios):
            _check_ratio(f"ratios[{i}]", r)
        prev = 0.0
        for i, b in enumerate(self.boundaries):
            if not prev < b < 1.0:
                raise ValueError(f"boundaries must be strictly increasing in (0, 1); boundaries[{i}]={b!r}")
            prev = b

    def __call__(self, progress: float) -> float:
        t = _check_progress(progress)
        idx = sum(1 for b in self.boundaries if t >= b)
        return self.ratios[idx]


def monotone_pieces(schedule: DensitySchedule) -> tuple[float, ...]:
    """Where ``schedule`` is monotone in floating point: the starts ``s_0 = 0 < s_1 < ...`` of the
    progress intervals ``[s_i, s_{i+1})`` (the last one closed at 1) on each of which the keep ratio,
    as the schedule computes it, never changes direction. A monotone function of the keep ratio is
    then a step function on each piece, whose steps a bisection over floats finds exactly.

    Exact for `ConstantSchedule` (one constant piece), `LinearSchedule` (one piece: a correctly
    rounded affine map is monotone) and `StepSchedule` (one constant piece per ratio, a boundary
    belonging to the piece it starts, as ``__call__`` does). Any other schedule (`CosineSchedule`:
    ``math.cos`` is not correctly rounded, so not monotone to the last bit) raises ``TypeError``.
    """
    if type(schedule) in (ConstantSchedule, LinearSchedule):  # a subclass may compute otherwise
        return (0.0,)
    if type(schedule) is StepSchedule:
        return (0.0, *(float(b) for b in schedule.boundaries))
    raise TypeError(
        "schedule must be a ConstantSchedule, LinearSchedule or StepSchedule to have exact monotone pieces, "
        f"got {type(schedule).__name__}"
    )
