"""Warm timings for the demo's tabs: dense and accelerated, interleaved, first calls excluded.

Every figure a tab shows comes from :func:`warm_compare`: one untimed warm-up call of each path
(one-time costs: allocator, caches, k-means cold starts, patch set-up), then ``repeats`` rounds
that run both paths alternately (order rotated each round), and the median of the per-round
speed-ups with its min-max spread (:mod:`mmaccel.runtime.timing`, the loop the benchmarks'
``harness.compare`` runs too). Few repeats keep a click at a few seconds on a CPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from mmaccel.runtime.timing import interleaved_times, ratio_spread

__all__ = ["WARM_REPEATS", "WarmTiming", "warm_compare", "gain_words"]

#: Timed rounds per click (after one warm-up call of each path).
WARM_REPEATS = 3
#: Below this warm speed-up the tab says the toy model is too small for a gain.
GAIN_THRESHOLD = 1.05


@dataclass(frozen=True)
class WarmTiming:
    """Warm seconds of the dense and the accelerated path and the speed-up (median, min-max)."""

    dense_s: tuple[float, ...]
    accelerated_s: tuple[float, ...]
    ratio: float
    ratio_min: float
    ratio_max: float
    overlaps: bool  # the two time ranges overlap: the ratio is within noise
    threads: int = field(default_factory=torch.get_num_threads)  # torch's CPU threads while timing

    @property
    def repeats(self) -> int:
        return len(self.dense_s)

    def method(self) -> str:
        return (
            f"median of {self.repeats} interleaved repeats after 1 warm-up call of each path "
            f"(warm-up excluded); torch threads: {self.threads}"
        )

    def ratio_text(self) -> str:
        noise = ", within noise" if self.overlaps else ""
        return f"{self.ratio:.2f}x (min-max {self.ratio_min:.2f}-{self.ratio_max:.2f}{noise})"

    def rows(self, what: str = "time", speedup: str = "speed-up") -> dict[str, str]:
        """Stats rows: both warm median times, the speed-up, and how they were measured."""
        d, a = statistics.median(self.dense_s), statistics.median(self.accelerated_s)
        return {
            f"{what} dense / accelerated (s, warm)": f"{d:.3f} / {a:.3f}",
            f"{speedup} (warm)": self.ratio_text(),
            "timing": self.method(),
        }


def warm_compare(
    dense: Callable[[], Any],
    accelerated: Callable[[], Any],
    repeats: int = WARM_REPEATS,
    patch: Callable[[], AbstractContextManager[Any]] | None = None,
) -> tuple[WarmTiming, Any, Any]:
    """Time ``dense`` and ``accelerated`` warm and interleaved; returns the timing and the last
    output of each. ``patch()`` is a context that turns the acceleration on; it is entered and
    left around every accelerated call, outside the timed span."""
    last: dict[str, Any] = {}

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            last[name] = fn()

        return call

    fns = {"dense": keep("dense", dense), "accelerated": keep("accelerated", accelerated)}
    times = interleaved_times(fns, repeats, warmup=1, around={"accelerated": patch} if patch else None)
    ratio, low, high, overlaps = ratio_spread(times["dense"], times["accelerated"])
    timing = WarmTiming(tuple(times["dense"]), tuple(times["accelerated"]), ratio, low, high, overlaps)
    return timing, last["dense"], last["accelerated"]


def gain_words(timing: WarmTiming, size: str) -> str:
    """One sentence on whether the toy model shows a gain; ``size`` says what is small about it."""
    if timing.ratio >= GAIN_THRESHOLD and not timing.overlaps:
        return f"The accelerated run is faster here ({timing.ratio:.2f}x warm)."
    if timing.ratio >= GAIN_THRESHOLD:
        return (
            f"On this toy model ({size}) the gain is within noise: {timing.ratio:.2f}x warm, but the two "
            "time ranges overlap. Press **time on a realistic shape** for the same settings on a realistic shape."
        )
    return (
        f"This toy model ({size}) is too small for a gain: {timing.ratio:.2f}x warm, the technique's "
        "own work costs about what it saves. Press **time on a realistic shape** for the same settings "
        "on a realistic shape."
    )
