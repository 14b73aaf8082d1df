"""Shared benchmark plumbing: timing, peak memory, machine description, RESULTS.md tables.

Speed and memory are reported as ratios against the baseline measured in the same process
run. :func:`compare` is the method every ratio should come from: each variant warmed up on its
shape, then at least 5 interleaved repeats (baseline and variants alternating, the order
rotated each round), the median ratio with its min-max spread, and a flag where the time
ranges overlap (the ratio is then within noise). :func:`measure` times a single callable.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak of live tensor storage
(:class:`PeakTensorBytes`) on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.timing import interleaved_times, ratio_spread

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
RESULTS_DIR = Path(__file__).with_name("results")  # one file of full tables per benchmark


@dataclass(frozen=True)
class Measurement:
    median_s: float
    times_s: tuple[float, ...]
    peak_bytes: int | None  # None: the call uses ops the CPU tracker cannot follow (see measure)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated and alive inside the ``with`` block.

    Counts the storages every op produces and releases them when their last tensor dies, so
    it measures activations (not weights created earlier) independently of the allocator,
    whose cached memory makes RSS deltas read ~0. Adds per-op Python overhead: never time
    code while it is active.
    """

    def __enter__(self) -> PeakTensorBytes:
        self.live, self.peak, self._refs = 0, 0, {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        try:
            key = storage.data_ptr()
        except RuntimeError:  # a wrapper without storage of its own (funcol's AsyncCollectiveTensor,
            return  # e.g. diffusers' Ulysses): its data is the collective's output, counted there
        if key not in self._refs:
            self._refs[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key][0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._refs[key]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device: torch.device | str | None = None
) -> Measurement:
    """Time ``fn`` (median of ``repeats`` after ``warmup``) and record its peak memory.

    Peak memory: ``torch.cuda.max_memory_allocated`` above the starting level on CUDA; on CPU
    one extra, untimed call under :class:`PeakTensorBytes`. Compiled higher-order ops (e.g.
    ``flex_attention``) cannot run under a dispatch mode: their peak is reported as ``None``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = _peak_bytes(fn, device)
    return Measurement(statistics.median(times), tuple(times), peak)


MIN_REPEATS = 5


@dataclass(frozen=True)
class Comparison:
    """One variant's times and its speed-up over the baseline, from interleaved repeats."""

    times_s: tuple[float, ...]
    ratio: float  # median over rounds of baseline time / this time (> 1: faster than the baseline)
    ratio_min: float
    ratio_max: float
    overlaps: bool  # this variant's [min, max] time range overlaps the baseline's: within noise; never set on the baseline
    peak_bytes: int | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def ratio_text(self) -> str:
        """``"2.01x (1.85-2.20)"``, with ``" ~noise"`` where the time ranges overlap."""
        return f"{self.ratio:.2f}x ({self.ratio_min:.2f}-{self.ratio_max:.2f})" + (" ~noise" if self.overlaps else "")

    def time_text(self) -> str:
        """``"0.123 s (0.120-0.131)"``: median and min-max of the repeats."""
        return f"{self.median_s:.3g} s ({min(self.times_s):.3g}-{max(self.times_s):.3g})"


def compare(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = MIN_REPEATS,
    warmup: int = 1,
    device: torch.device | str | None = None,
    memory: bool = False,
) -> dict[str, Comparison]:
    """Time every callable of ``fns`` (the first is the baseline) in interleaved rounds.

    Each callable is warmed up ``warmup`` times on its own first (per-shape warm-up: compiles,
    caches, allocator). Then ``repeats`` rounds each time every callable once, the order rotated
    by one each round, so drift and neighbour load hit all alike. A variant's ratio is the median
    of the per-round ``baseline / variant`` times, with their min and max. ``memory=True`` adds one
    untimed call per callable for peak memory (see :func:`measure`). The timing loop and the
    ratio spread are :mod:`mmaccel.runtime.timing`'s (the demo times its tabs with them too).
    """
    if len(fns) < 2:
        raise ValueError(f"fns needs a baseline and at least one variant, got {len(fns)}")
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be >= {MIN_REPEATS} for a ratio with spread, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sync = (lambda: _sync(device)) if device is not None and torch.device(device).type == "cuda" else None
    times = interleaved_times(fns, repeats, warmup, sync)
    names = list(fns)
    base = times[names[0]]
    out = {}
    for name in names:
        ratio, low, high, overlaps = ratio_spread(base, times[name])
        peak = _peak_bytes(fns[name], device) if memory else None
        out[name] = Comparison(tuple(times[name]), ratio, low, high, overlaps and name != names[0], peak)
    return out


def _peak_bytes(fn: Callable[[], object], device: torch.device | str | None) -> int | None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with PeakTensorBytes() as tracker:
            fn()
        return tracker.peak
    except NotImplementedError:  # higher-order op under a TorchDispatchMode
        return None


def append_results(title: str, table: str, notes: str = "", path: Path = RESULTS_PATH) -> None:
    """Append a titled table, with the machine it ran on, to ``benchmarks/RESULTS.md``."""
    block = f"\n## {title}\n\nMachine: {machine_description()}\n\n{table}\n"
    if notes:
        block += f"\n{notes}\n"
    with open(path, "a") as f:
        f.write(block)


def timing_parser(description: str, quick_help: str, results: Path) -> argparse.ArgumentParser:
    """The flags every timing benchmark shares: ``--quick``, ``--repeats`` (interleaved rounds of
    :func:`compare`), ``--threads`` and ``--write``; read them back with :func:`parse_timing_args`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--repeats", type=int, default=MIN_REPEATS, help=f"interleaved timing rounds (>= {MIN_REPEATS})"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help=f"append the tables to {results}")
    return parser


def parse_timing_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, refusing ``--repeats`` below :data:`MIN_REPEATS` and ``--threads`` below 1 before any
    work, and fix the torch thread count."""
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be >= {MIN_REPEATS}, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return args
