"""Shared benchmark plumbing: timing, peak memory, machine description, RESULTS.md tables.

Speed and memory are reported as ratios against the baseline measured in the same process
run: median of ``repeats`` timed calls after ``warmup`` untimed ones. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the peak resident set size above
the level before the call, sampled every millisecond from ``/proc/self/statm``.
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.environment import cpu_model

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")


@dataclass(frozen=True)
class Measurement:
    median_s: float
    times_s: tuple[float, ...]
    peak_bytes: int


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples RSS in a background thread; ``peak`` is the maximum above the starting level."""

    def __init__(self, interval_s: float = 1e-3) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _PeakRSS:
        self._base = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self._base)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self._base)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device: torch.device | str | None = None
) -> Measurement:
    """Time ``fn`` (median of ``repeats`` after ``warmup``) and record its peak memory."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    peak = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(repeats):
        if cuda:
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        else:
            with _PeakRSS() as rss:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            peak = max(peak, rss.peak)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    return Measurement(statistics.median(times), tuple(times), int(peak))


def machine_description() -> str:
    """One line naming the machine a table was measured on."""
    parts = [
        f"CPU {cpu_model()}",
        f"{torch.get_num_threads()} threads",
        f"torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    else:
        parts.append("no GPU")
    parts.append(_dt.date.today().isoformat())
    return ", ".join(parts)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, table: str, notes: str = "", path: Path = RESULTS_PATH) -> None:
    """Append a titled table, with the machine it ran on, to ``benchmarks/RESULTS.md``."""
    block = f"\n## {title}\n\nMachine: {machine_description()}\n\n{table}\n"
    if notes:
        block += f"\n{notes}\n"
    with open(path, "a") as f:
        f.write(block)
