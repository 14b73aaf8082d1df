"""Shared benchmark plumbing: timing, peak memory, machine description, RESULTS.md tables.

Speed and memory are reported as ratios against the baseline measured in the same process
run: median of ``repeats`` timed calls after ``warmup`` untimed ones. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the peak of live tensor storage
(:class:`PeakTensorBytes`) on CPU.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mmaccel.runtime.environment import machine_description

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
        key = storage.data_ptr()
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
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        try:
            with PeakTensorBytes() as tracker:
                fn()
            peak = tracker.peak
        except NotImplementedError:  # higher-order op under a TorchDispatchMode
            peak = None
    return Measurement(statistics.median(times), tuple(times), peak)


def append_results(title: str, table: str, notes: str = "", path: Path = RESULTS_PATH) -> None:
    """Append a titled table, with the machine it ran on, to ``benchmarks/RESULTS.md``."""
    block = f"\n## {title}\n\nMachine: {machine_description()}\n\n{table}\n"
    if notes:
        block += f"\n{notes}\n"
    with open(path, "a") as f:
        f.write(block)
