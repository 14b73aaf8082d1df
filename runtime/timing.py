"""Warm, interleaved timing of a baseline and its variants (shared by the benchmarks and the demo).

:func:`interleaved_times` warms every callable up on its own first (compiles, caches, allocator),
then times ``repeats`` rounds, each running every callable once with the order rotated by one per
round, so drift and neighbour load hit all alike. :func:`ratio_spread` turns two such time lists
into a speed-up: the median of the per-round ``baseline / variant`` ratios, their min and max, and
whether the two time ranges overlap (the ratio is then within noise).
``mmaccel.benchmarks.harness.compare`` builds on both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

__all__ = ["interleaved_times", "ratio_spread"]


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    around: Mapping[str, Callable[[], AbstractContextManager[object]]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every callable of ``fns``: ``warmup`` untimed calls each (in order),
    then ``repeats`` interleaved rounds rotated by one each round. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after the warm-ups and after every timed call.

    ``around[name]()``, where given, is a context entered before and left after each call of
    ``name`` outside its timed span: a patch that must be on only for that variant (applied and
    removed around every call, since the variants alternate) is not timed."""
    if len(fns) < 2:
        raise ValueError(f"fns needs a baseline and at least one variant, got {len(fns)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    around = dict(around or {})
    if set(around) - set(fns):
        raise ValueError(f"around names {sorted(set(around) - set(fns))} are not in fns")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            with around.get(name, nullcontext)():
                fns[name]()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with around.get(name, nullcontext)():
                start = time.perf_counter()
                fns[name]()
                if sync is not None:
                    sync()
                times[name].append(time.perf_counter() - start)
    return times


def ratio_spread(base: Sequence[float], times: Sequence[float]) -> tuple[float, float, float, bool]:
    """``(median, min, max, overlaps)`` of the per-round ratios ``base[i] / times[i]``; ``overlaps``:
    the ``[min, max]`` ranges of the two time lists intersect."""
    if len(base) != len(times) or not base:
        raise ValueError(f"need two equally long, non-empty time lists, got {len(base)} and {len(times)}")
    ratios = [b / t for b, t in zip(base, times)]
    overlaps = min(times) <= max(base) and min(base) <= max(times)
    return statistics.median(ratios), min(ratios), max(ratios), overlaps
