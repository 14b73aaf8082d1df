"""Timing, profiling, GPU state, on-device random weights and FLOP floors for ``steps.py``.

- :func:`time_variants`: CUDA-event timing (``perf_counter`` on CPU), a warm-up per variant, then
  >= 10 interleaved rounds (order rotated each round); median with min-max per variant, and each
  variant's per-round speed-up over the first.
- :func:`profile_call`: one ``torch.profiler`` run of a call: top kernels by device time, the
  GPU-busy fraction of the call's wall time (union of kernel intervals; low = launch- or
  host-bound), time in the technique's main kernel (a name pattern) against everything else, and
  host-device synchronisations (``cudaDeviceSynchronize`` / ``cudaStreamSynchronize`` /
  ``cudaEventSynchronize`` and device-to-host copies). On CPU the top ops by CPU time and the
  synchronisations counted by :class:`mmaccel.testing.hotpath.HotPathCounter`.
- :func:`gpu_state`: ``nvidia-smi`` clocks, temperature, power, throttle reasons and other processes.
- :func:`on_device`: a model built on the meta device, ``to_empty`` on the target device and its
  parameters initialised there (no CPU init of billions of parameters); buffers computed at
  construction (rotary tables, position ids) are built on the device and kept.
- :data:`PEAK` and :func:`floor_s`: the FLOP and byte floors of a call on an H100 / H200.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

# dense bf16 tensor-core FLOP/s and HBM bytes/s (NVIDIA's H100 SXM / H200 datasheets)
PEAK = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
_SYNC_API = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def floor_s(flops: float, nbytes: float, gpu: str = "H100") -> float:
    """The time a call cannot beat: max(FLOPs / peak FLOP/s, bytes / peak bandwidth)."""
    peak_flops, peak_bw = PEAK[gpu]
    return max(flops / peak_flops, nbytes / peak_bw)


def gpu_state() -> dict[str, Any] | None:
    """Clocks (MHz), temperature (C), power (W), utilisation, throttle reasons and the compute
    processes on the GPU, from ``nvidia-smi``; None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,"
              "memory.used,pstate,clocks_throttle_reasons.active")  # fmt: skip
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    state = dict(zip(fields.split(","), (v.strip() for v in out.splitlines()[0].split(",")))) if out else {}
    state["processes"] = [line.strip() for line in apps.splitlines() if line.strip()]
    return state


def _timer(device: str) -> Callable[[Callable[[], object]], Callable[[], float]]:
    """``start(fn)`` runs ``fn`` and returns a ``stop()`` that gives its seconds (CUDA events on a GPU)."""
    if device == "cuda":

        def start(fn: Callable[[], object]) -> Callable[[], float]:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            return lambda: begin.elapsed_time(end) / 1e3

        return start

    def start_cpu(fn: Callable[[], object]) -> Callable[[], float]:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return lambda: dt

    return start_cpu


def time_variants(
    fns: dict[str, Callable[[], object]], device: str, rounds: int = 10, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Warm each variant up, then ``rounds`` interleaved rounds (order rotated by one each round);
    per variant its times, median/min/max and its per-round speed-up over the first variant."""
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3 (10 unless a step's cap allows fewer), got {rounds}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = _timer(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        stops = [(n, start(fns[n])) for n in order]
        sync()
        for n, stop in stops:
            times[n].append(stop())
    base = times[names[0]]
    out = {}
    for n in names:
        ratios = sorted(b / t for b, t in zip(base, times[n]))
        out[n] = {"median_s": statistics.median(times[n]), "min_s": min(times[n]), "max_s": max(times[n]),
                  "times_s": times[n], "ratio": statistics.median(ratios), "ratio_min": ratios[0],
                  "ratio_max": ratios[-1], "rounds": rounds}  # fmt: skip
    return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_call(fn: Callable[[], object], device: str, main: str | None = None, top: int = 8) -> dict[str, Any]:
    """One profiled call of ``fn`` (after the caller's warm-up): see the module docstring."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from mmaccel.testing.hotpath import HotPathCounter

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        with record_function("mmaccel_call"):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    out: dict[str, Any] = {"wall_ms": wall_us / 1e3}
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        call = [e for e in events if e.name == "mmaccel_call" and e.device_type == torch.autograd.DeviceType.CPU]
        span = (call[0].time_range.end - call[0].time_range.start) if call else wall_us
        busy = _union_us([(k.time_range.start, k.time_range.end) for k in kernels])
        last = max((k.time_range.end for k in kernels), default=0.0)
        first = call[0].time_range.start if call else min((k.time_range.start for k in kernels), default=0.0)
        window = max(span, last - first)
        by_name: dict[str, list[float]] = {}
        for k in kernels:
            by_name.setdefault(k.name, []).append(k.time_range.end - k.time_range.start)
        total = sum(sum(v) for v in by_name.values())
        ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
        out["kernels"] = [{"name": n[:120], "ms": sum(v) / 1e3, "calls": len(v), "pct": 100 * sum(v) / max(total, 1e-9)}
                          for n, v in ranked[:top]]  # fmt: skip
        out["kernel_count"] = len(kernels)
        out["busy_fraction"] = busy / max(window, 1e-9)
        out["device_ms"] = total / 1e3
        if main:
            pat = re.compile(main, re.I)
            inside = sum(sum(v) for n, v in by_name.items() if pat.search(n))
            out["main_kernel"] = {"pattern": main, "ms": inside / 1e3, "rest_ms": (total - inside) / 1e3}
        lo = call[0].time_range.start if call else float("-inf")
        hi = call[0].time_range.end if call else float("inf")
        inside_call = [e for e in events if lo <= e.time_range.start <= hi]  # not the profiler's own final sync
        syncs = [e for e in inside_call if e.device_type == torch.autograd.DeviceType.CPU
                 and any(api in e.name for api in _SYNC_API)]  # fmt: skip
        d2h = [e for e in events if "Memcpy DtoH" in e.name and lo <= e.time_range.start]
        out["syncs"] = {"sync_calls": len(syncs), "device_to_host_copies": len(d2h)}
    else:
        ranked = sorted((e for e in prof.key_averages() if e.key != "mmaccel_call"),
                        key=lambda e: -e.self_cpu_time_total)  # fmt: skip
        out["kernels"] = [{"name": e.key[:120], "ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                          for e in ranked[:top]]  # fmt: skip
        with contextlib.suppress(NotImplementedError), torch.no_grad(), HotPathCounter() as count:
            fn()  # compiled higher-order ops cannot run under a dispatch mode: no count then
        out["syncs"] = {"counted": count.syncs, "kinds": dict(count.sync_counts), "ops": count.ops}
    return out


@torch.no_grad()
def _init_on_device(model: torch.nn.Module, seed: int) -> None:
    """Random weights in place: matrices N(0, 0.02), 1-D weights 1, biases 0 (speed only)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def on_device(build: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """``build()`` with its parameters on the meta device (buffers on ``device``), moved with
    ``to_empty`` and initialised on ``device`` in ``dtype``; buffers keep their computed values,
    floating ones cast to ``dtype`` as ``model.to(dtype)`` would."""
    from accelerate import init_empty_weights

    with torch.device(device), init_empty_weights(include_buffers=False):
        model = build()
    buffers = {name: b.to(dtype) if b.is_floating_point() else b for name, b in model.named_buffers()}
    model = model.to(dtype)  # meta parameters: free (as ``model.to(dtype)`` casts a built model)
    model.to_empty(device=device)
    for name, b in buffers.items():  # to_empty left them empty: put the computed values back
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[attr] = b.to(device)
    _init_on_device(model, seed)
    return model.eval()


def regional_compile(model: torch.nn.Module, backend: str = "inductor") -> str:
    """Compile the repeated blocks only: diffusers' ``compile_repeated_blocks`` where the class
    names them, else each block of ``transformer_blocks`` / ``blocks`` / ``layers`` in place."""
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(dynamic=False, backend=backend)
        return "compile_repeated_blocks"
    for attr in ("transformer_blocks", "blocks", "layers"):
        blocks = getattr(model, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                block.compile(dynamic=False, backend=backend)
            return f"per block ({attr})"
    raise ValueError(f"regional_compile: {type(model).__name__} has no repeated blocks to compile")
