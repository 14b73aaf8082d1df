"""Limits checked before any work starts: prompts, tokens, steps, frames, images, video memory and time.

One set of limits (:class:`Limits`) is used by the CLI, the demo and the Python API alike
(``VLM.generate(..., limits=Limits(max_new_tokens=8192))``; ``mmaccel video --max-steps N``).
Everything here is plain arithmetic on the requested sizes and the model's config, so a request
that cannot fit (``--frames 1000000001``, ``--steps 100000000``) is refused in microseconds,
before a model loads or a tensor is allocated. Errors are one-line ``ValueError`` / ``TypeError``
naming the setting, the allowed range and how to raise the limit (docs/errors.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mmaccel.runtime.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, PIL_MAX_PIXELS

__all__ = [
    "MAX_FRAMES",
    "MAX_MINUTES",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_CHARS",
    "MAX_STEPS",
    "MEMORY_LIMIT_ENV",
    "PEAK_FLOPS",
    "SCHEDULE_BYTES_PER_STEP",
    "Limits",
    "MemoryEstimate",
    "TimeEstimate",
    "as_int",
    "available_memory",
    "check_context",
    "check_image_array",
    "check_prompt",
    "check_step_eta",
    "check_video_memory",
    "check_video_time",
    "estimate_video_memory",
    "estimate_video_time",
    "format_bytes",
    "format_duration",
    "parse_bytes",
    "read_video_model_config",
]

#: Longest prompt accepted by default (characters). Text encoders read at most a few hundred
#: tokens (Wan: 512), so anything longer would be cut silently.
MAX_PROMPT_CHARS = 4000
#: Most tokens one generate call may add (raise with ``Limits(max_new_tokens=N)``).
MAX_NEW_TOKENS = 4096
#: Most denoising steps (raise with ``--max-steps`` / ``Limits(max_steps=N)``): reference
#: samplers use 20 to 100; the scheduler's arrays alone grow by ~180 bytes a step.
MAX_STEPS = 1000
#: Most video frames (raise with ``--max-frames`` / ``Limits(max_frames=N)``); memory is checked too.
MAX_FRAMES = 10_001
#: Longest video generation accepted by default, in minutes of denoising on one rank (raise with
#: ``--max-minutes`` / ``Limits(max_minutes=N)``): checked before any work against a FLOP lower
#: bound (:func:`estimate_video_time`), then against a measured step (:func:`check_step_eta`).
MAX_MINUTES = 24 * 60
#: FLOP/s no device of a kind reaches, so FLOPs / peak is a lower bound on the time. ``cuda``: above
#: every current GPU's dense bf16/fp16 tensor-core peak (H100 and H200 SXM 0.99, B200 2.25 PFLOP/s);
#: ``cpu_fp32``: per thread, above two AVX-512 FMA units at 4 GHz (2 x 16 lanes x 2 FLOP x 4 GHz =
#: 256 GFLOP/s); ``cpu_half``: per thread for bf16/fp16, above an AMX tile unit (~2 TFLOP/s a core).
PEAK_FLOPS = {"cuda": 5.0e15, "cpu_fp32": 2.6e11, "cpu_half": 4.0e12}
#: Host bytes the pipeline's step schedule takes per denoising step, an upper bound: the zoo's
#: UniPC scheduler's ``set_timesteps`` measured 32 B/step; a whole ``mmaccel video`` run with
#: ``--steps 100000000`` reached 17.8 GB before its first step (178 B/step, issue #31).
SCHEDULE_BYTES_PER_STEP = 256
#: Environment variable overriding the detected free memory: bytes with an optional unit
#: ("48GiB", "500MB"), or "off" to skip the memory check.
MEMORY_LIMIT_ENV = "MMACCEL_MEMORY_LIMIT"


def as_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; integral floats (``3.0``, as UIs send) are accepted.

    ``1.5``, ``nan``, ``True`` or a string raise ``ValueError`` / ``TypeError`` naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an integer in [{low}, {high}], got {type(value).__name__}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class Limits:
    """The limits every front door checks before any work (CLI, demo, Python API).

    Raise one explicitly: ``Limits(max_steps=5000)``. Each value is an int >= 1; ``max_pixels``
    is at most PIL's own decompression-bomb limit; ``max_minutes`` bounds a video generation's
    denoising time on one rank (:func:`check_video_time` before any work, :func:`check_step_eta`
    once a step is measured).
    """

    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_new_tokens: int = MAX_NEW_TOKENS
    max_steps: int = MAX_STEPS
    max_frames: int = MAX_FRAMES
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_minutes: int = MAX_MINUTES

    def __post_init__(self) -> None:
        for f in fields(self):
            high = PIL_MAX_PIXELS if f.name == "max_pixels" else 2**40
            as_int(f"Limits.{f.name}", getattr(self, f.name), 1, high)
        if self.min_side**2 > self.max_pixels:
            raise ValueError(f"Limits.max_pixels={self.max_pixels} is below min_side**2={self.min_side**2}")

    def steps(self, value: Any, name: str = "steps", flag: str = "max_steps") -> int:
        """``value`` as denoising steps in [1, max_steps]; the message names ``flag`` to raise it."""
        return _capped(name, value, self.max_steps, flag)

    def frames(self, value: Any, name: str = "frames", flag: str = "max_frames") -> int:
        """``value`` as video frames in [1, max_frames]."""
        return _capped(name, value, self.max_frames, flag)

    def new_tokens(self, value: Any, name: str = "max_new_tokens", flag: str = "Limits.max_new_tokens") -> int:
        """``value`` as new tokens in [1, max_new_tokens]."""
        return _capped(name, value, self.max_new_tokens, flag)

    def prompt(self, value: Any, name: str = "prompt", allow_empty: bool = False) -> str:
        """``value`` as a prompt of at most ``max_prompt_chars`` characters, no NUL."""
        return check_prompt(value, name=name, max_chars=self.max_prompt_chars, allow_empty=allow_empty)


def _capped(name: str, value: Any, high: int, flag: str) -> int:
    try:
        return as_int(name, value, 1, high)
    except ValueError as err:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > high:
            raise ValueError(f"{err} (raise the limit with {flag})") from None
        raise


def check_context(prompt_tokens: int, new_tokens: int, context: int | None, *, name: str = "prompt") -> None:
    """``ValueError`` when ``prompt_tokens + new_tokens`` exceeds the model's ``context`` (its
    ``max_position_embeddings``): past it the model indexes positions it was never given."""
    if context is None or prompt_tokens + new_tokens <= context:
        return
    room = context - prompt_tokens
    fix = f"at most {room} new tokens fit" if room > 0 else "shorten the prompt"
    raise ValueError(
        f"{name} is {prompt_tokens:,} tokens (image tokens included) + {new_tokens:,} new tokens, over the "
        f"model's context of {context:,} tokens; {fix}"
    )


def check_image_array(image: Any, *, name: str = "image", min_side: int = DEFAULT_MIN_SIDE,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> None:  # fmt: skip
    """``ValueError`` for an image array that is not ``(H, W[, 1|3|4])``, has a side under
    ``min_side``, more than ``max_pixels`` pixels, or non-finite values."""
    import numpy as np

    shape = tuple(getattr(image, "shape", ()))
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ValueError(f"{name} arrays must be (H, W) or (H, W, 1|3|4), got shape {shape}")
    h, w = shape[:2]
    if min(h, w) < min_side:
        raise ValueError(f"{name} is {w}x{h}; each side must be at least {min_side} px")
    if h * w > max_pixels:
        raise ValueError(f"{name} is {w}x{h} = {h * w:,} pixels; the limit is {max_pixels:,} (max_pixels)")
    array = np.asarray(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")


def check_prompt(
    prompt: Any, *, name: str = "prompt", max_chars: int = MAX_PROMPT_CHARS, allow_empty: bool = False
) -> str:
    """``prompt`` if it is a str of at most ``max_chars`` characters (and not blank, unless allowed)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be a str, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise ValueError(f"{name} is empty; give 1 to {max_chars} characters")
    if "\x00" in prompt:
        raise ValueError(f"{name} contains a NUL character")
    if len(prompt) > max_chars:
        raise ValueError(f"{name} is {len(prompt):,} characters; at most {max_chars:,} are allowed")
    return prompt


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str, *, name: str = MEMORY_LIMIT_ENV) -> int:
    """``"48GiB"``, ``"500 MB"``, ``"1e9"`` -> bytes; ``ValueError`` naming ``name`` otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{name} must be a size such as 48GiB, 500MB or 1e9 (bytes), or 'off'; got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < value < 2**63:
        raise ValueError(f"{name} must be a size > 0, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes as a short human string: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _host_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: Any = "cpu") -> int | None:
    """Free bytes on ``device`` (host memory for the CPU), or ``None`` when the check is off.

    ``MMACCEL_MEMORY_LIMIT`` overrides the detected value (``"64GiB"``), ``"off"`` disables it.
    """
    override = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if override.lower() == "off":
        return None
    if override:
        return parse_bytes(override)
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _host_available()


@dataclass(frozen=True)
class MemoryEstimate:
    """Lower-bound bytes a video generation needs, per part (model weights not included).

    ``latents``: the noise/latent tensors and their per-step copies on one rank; ``activations``:
    one transformer block's working set for one rank's tokens; ``frames``: the decoded float video
    that rank 0 gathers and writes (host memory); ``schedule``: the scheduler's per-step arrays
    (``steps * SCHEDULE_BYTES_PER_STEP``, host memory).
    """

    latents: int
    activations: int
    frames: int
    latent_frames: int
    tokens: int
    schedule: int = 0

    @property
    def device_bytes(self) -> int:
        return self.latents + self.activations

    @property
    def total(self) -> int:
        return self.latents + self.activations + self.frames + self.schedule


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def estimate_video_memory(
    frames: int,
    height: int,
    width: int,
    transformer_config: Mapping[str, Any],
    *,
    temporal_stride: int = 4,
    spatial_stride: int = 8,
    ranks: int = 1,
    dtype_bytes: int = 4,
    guidance: bool = True,
    steps: int = 1,
) -> MemoryEstimate:
    """Estimate the memory of generating ``frames`` x ``height`` x ``width`` with a Wan-style model.

    ``transformer_config`` is the transformer's ``config`` (``in_channels``, ``patch_size``,
    ``num_attention_heads``, ``attention_head_dim``, ``ffn_dim``); ``steps`` the denoising steps
    (the schedule's host arrays). Pure integer arithmetic: no tensor is allocated, so absurd sizes
    are answered at once.
    """
    for name, value in (("frames", frames), ("height", height), ("width", width), ("ranks", ranks), ("steps", steps),
                        ("temporal_stride", temporal_stride), ("spatial_stride", spatial_stride),
                        ("dtype_bytes", dtype_bytes)):  # fmt: skip
        _positive(name, value)
    cfg = dict(transformer_config)
    try:
        channels = int(cfg["in_channels"])
        patch = cfg.get("patch_size", (1, 2, 2))
        pt, ph, pw = (int(p) for p in patch)
        hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        ffn = int(cfg.get("ffn_dim", 4 * hidden))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"transformer_config lacks what the estimate needs: {err}") from None
    latent_frames = (frames - 1) // temporal_stride + 1
    lh, lw = height // spatial_stride, width // spatial_stride
    latent_elems = channels * latent_frames * lh * lw
    # float32 latents, the model input, the prediction (twice with guidance) and the scheduler's copy
    latents = latent_elems * 4 * (5 if guidance else 4) // ranks
    tokens = math.ceil(latent_frames / pt) * max(1, lh // ph) * max(1, lw // pw)
    rank_tokens = math.ceil(tokens / ranks)
    # one block: hidden states, q, k, v, attention output, residual + the FFN's intermediate
    activations = rank_tokens * (6 * hidden + ffn) * dtype_bytes * (2 if guidance else 1)
    decoded = frames * height * width * 3 * 4 * 2  # float32 frames, gathered + the numpy copy
    return MemoryEstimate(latents, activations, decoded, latent_frames, tokens, steps * SCHEDULE_BYTES_PER_STEP)


def check_video_memory(
    estimate: MemoryEstimate, device: Any = "cpu", *, hint: str = "--frames, --steps, --height or --width"
) -> None:
    """``ValueError`` when ``estimate`` does not fit in the free memory of ``device`` and the host.

    The message names the parts of the estimate, what is free, the settings to lower (``hint``) and
    ``MMACCEL_MEMORY_LIMIT`` to override the detected free memory.
    """
    kind = getattr(device, "type", str(device).split(":")[0])
    host = estimate.total if kind != "cuda" else estimate.frames + estimate.schedule
    checks = [("host memory", host, available_memory("cpu"))]
    if kind == "cuda":
        checks.insert(0, (f"{device} memory", estimate.device_bytes, available_memory(device)))
    for where, need, free in checks:
        if free is not None and need > free:
            raise ValueError(
                f"this video needs at least {format_bytes(need)} of {where} (latents "
                f"{format_bytes(estimate.latents)}, activations {format_bytes(estimate.activations)}, "
                f"decoded frames {format_bytes(estimate.frames)}, schedule {format_bytes(estimate.schedule)}) but {format_bytes(free)} is free; "
                f"lower {hint}, use more ranks, or set {MEMORY_LIMIT_ENV} (e.g. 64GiB, or off)"
            )


def read_video_model_config(folder: str | Path) -> tuple[dict[str, Any], int, int]:
    """``(transformer config, temporal stride, spatial stride)`` of a saved WanPipeline folder.

    Reads ``transformer/config.json`` and ``vae/config.json`` only (nothing is loaded), so the
    memory estimate runs before the model.
    """
    folder = Path(folder)
    path = folder / "transformer" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no transformer/config.json (not a WanPipeline folder)")
    try:
        transformer = json.loads(path.read_text())
        vae_path = folder / "vae" / "config.json"
        vae = json.loads(vae_path.read_text()) if vae_path.is_file() else {}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the model config in {str(folder)!r}: {err}") from None
    return transformer, int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))


# ------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeEstimate:
    """Lower bound on the denoising time of a video generation on one rank.

    ``flops_per_step``: one rank's transformer FLOPs for one denoising step (both classifier-free
    guidance branches); ``steps``: the steps counted (a caller running several generations counts
    them all); ``peak_flops``: the FLOP/s no device of that kind reaches (:data:`PEAK_FLOPS`), so
    ``seconds`` never overstates the time (the text encoder, the VAE and the attention beyond each
    query's own latent frame are not counted); ``device`` names what the peak is for.
    """

    flops_per_step: int
    steps: int
    peak_flops: float
    device: str

    @property
    def flops(self) -> int:
        return self.flops_per_step * self.steps

    @property
    def seconds(self) -> float:
        return self.flops / self.peak_flops


def _peak_flops(device: Any, dtype_bytes: int, threads: int | None) -> tuple[float, str]:
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        return PEAK_FLOPS["cuda"], "a CUDA device"
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    per_thread = PEAK_FLOPS["cpu_fp32" if dtype_bytes >= 4 else "cpu_half"]
    return per_thread * threads, f"{threads} CPU thread(s)"


def estimate_video_time(
    frames: int,
    height: int,
    width: int,
    transformer_config: Mapping[str, Any],
    *,
    steps: int,
    temporal_stride: int = 4,
    spatial_stride: int = 8,
    ranks: int = 1,
    guidance: bool = True,
    text_tokens: int = 512,
    device: Any = "cpu",
    dtype_bytes: int = 4,
    threads: int | None = None,
) -> TimeEstimate:
    """A lower bound on the time one rank denoises ``frames`` x ``height`` x ``width`` for ``steps``
    steps with a Wan-style transformer (``transformer_config``: ``num_layers``,
    ``num_attention_heads``, ``attention_head_dim``, ``ffn_dim``, ``patch_size``), the work split
    evenly over ``ranks`` (clip or layer parallel).

    Per block and token: the self- and cross-attention projections (q, k, v, o and q, o: 12 d^2),
    the FFN (4 d f), self-attention scores against at least the token's own latent frame and
    cross-attention scores against ``text_tokens`` (4 d keys); per block and call the text's K/V
    (4 d^2 text_tokens). Pure arithmetic, like :func:`estimate_video_memory`.
    """
    for name, value in (("frames", frames), ("height", height), ("width", width), ("ranks", ranks), ("steps", steps),
                        ("temporal_stride", temporal_stride), ("spatial_stride", spatial_stride),
                        ("text_tokens", text_tokens), ("dtype_bytes", dtype_bytes)):  # fmt: skip
        _positive(name, value)
    cfg = dict(transformer_config)
    try:
        pt, ph, pw = (int(p) for p in cfg.get("patch_size", (1, 2, 2)))
        hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        ffn = int(cfg.get("ffn_dim", 4 * hidden))
        layers = int(cfg["num_layers"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"transformer_config lacks what the time estimate needs: {err}") from None
    latent_frames = (frames - 1) // temporal_stride + 1
    frame_tokens = max(1, height // spatial_stride // ph) * max(1, width // spatial_stride // pw)
    tokens = math.ceil(latent_frames / pt) * frame_tokens
    per_token = 12 * hidden * hidden + 4 * hidden * ffn + 4 * hidden * (frame_tokens + text_tokens)
    per_call = layers * (tokens * per_token + 4 * hidden * hidden * text_tokens)
    per_step = per_call * (2 if guidance else 1) // ranks
    peak, where = _peak_flops(device, dtype_bytes, threads)
    return TimeEstimate(per_step, steps, peak, where)


def format_duration(seconds: float) -> str:
    """Seconds as a short human string: ``42 s``, ``12.5 min``, ``57 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:,.1f} min" if seconds < 48 * 3600 else f"{seconds / 3600:,.0f} h"


def check_video_time(
    estimate: TimeEstimate, max_minutes: int, *, flag: str = "--max-minutes",
    hint: str = "--steps, --frames, --height or --width",
) -> None:  # fmt: skip
    """``ValueError`` when even the lower bound ``estimate`` exceeds ``max_minutes``; the message
    names the FLOPs, the peak assumed, the limit, ``flag`` to raise it and ``hint`` to lower."""
    if estimate.seconds <= max_minutes * 60:
        return
    raise ValueError(
        f"this video needs at least {format_duration(estimate.seconds)} of denoising per rank "
        f"({estimate.flops / 1e12:,.0f} TFLOP in {estimate.steps:,} steps at no more than "
        f"{estimate.peak_flops / 1e12:,.2f} TFLOP/s on {estimate.device}), over the limit of {max_minutes:,} min; "
        f"lower {hint}, use more ranks, or raise the limit with {flag}"
    )


def check_step_eta(
    elapsed_s: float, step_s: float, remaining: int, max_minutes: int, *, flag: str = "--max-minutes",
    hint: str | None = None, unit: str = "step",
) -> float:  # fmt: skip
    """Once a step (or another ``unit`` of work) is measured: the estimated seconds left
    (``step_s`` x ``remaining`` units);
    ``ValueError`` when ``elapsed_s`` (the run so far) plus that exceeds ``max_minutes``. ``hint``
    ends the message (where the finished steps are kept and how to continue, so nothing is lost)."""
    eta = step_s * remaining
    if elapsed_s + eta <= max_minutes * 60:
        return eta
    where = f"; {hint}" if hint else ""
    raise ValueError(
        f"a {unit} takes {step_s:,.2f} s, so the remaining {remaining:,} {unit}s need about {format_duration(eta)} "
        f"(after {format_duration(elapsed_s)} so far), over the limit of {max_minutes:,} min; raise it with {flag}, "
        f"or lower the steps, frames or size{where}"
    )
