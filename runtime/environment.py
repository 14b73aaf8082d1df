"""What this machine can run right now: library versions, device, and usable backends.

A backend counts as usable only if a tiny operation actually ran (xformers, for instance,
imports on CPU but cannot run there).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = ["BackendStatus", "probe_backends", "library_versions", "device_summary", "cpu_model", "machine_description"]

_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "einops", "safetensors", "gradio", "xformers")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries mmaccel builds on (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_summary() -> dict[str, object]:
    """Default device, CPU threads, and the CUDA devices visible to torch."""
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def _probe(name: str, fn: Callable[[], str]) -> BackendStatus:
    try:
        return BackendStatus(name, True, fn())
    except Exception as exc:  # a probe reports why a backend is unusable; it never raises
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BackendStatus(name, False, f"{type(exc).__name__}: {msg[:200]}")


def _cuda() -> str:
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    x = torch.ones(4, device="cuda")
    torch.cuda.synchronize()
    return f"{torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}, sum={x.sum().item():.0f}"


def _flex_attention() -> str:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 1, 128, 16, device=device)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, 128, 128, device=device)
    start = time.perf_counter()
    out = torch.compile(flex_attention, dynamic=False)(q, q, q, block_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    err = (out - ref).abs().max().item()
    if err > 1e-3:
        raise RuntimeError(f"compiled flex_attention disagrees with SDPA (max abs err {err:.2e})")
    return f"compiled on {device} in {time.perf_counter() - start:.1f} s"


def _xformers() -> str:
    import xformers.ops as xops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 16, 1, 16, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    xops.memory_efficient_attention(q, q, q)
    return f"memory_efficient_attention ran on {device}"


def probe_backends(compile_flex: bool = True) -> list[BackendStatus]:
    """Run a tiny op on each optional backend and report which ones work here.

    ``compile_flex=False`` skips the flex_attention probe (it compiles, ~5 s on CPU).
    """
    probes: list[tuple[str, Callable[[], str]]] = [("cuda", _cuda)]
    if compile_flex:
        probes.append(("flex_attention (compiled)", _flex_attention))
    probes.append(("xformers", _xformers))
    return [_probe(name, fn) for name, fn in probes]


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
    parts.append(datetime.date.today().isoformat())
    return ", ".join(parts)
