"""`generate_long_video`: a long Wan video over all ranks, frames gathered to rank 0.

``mode="clip"``: every rank calls the stock ``WanPipeline`` on its own clip, with
:func:`apply_clip_parallel` installed, its clip's noise passed as ``latents=`` and the per-step
checkpoint taken in ``callback_on_step_end``; the pipeline does the text encoding, classifier-free
guidance and scheduler steps, so one rank reproduces ``pipe(..., latents=...)`` exactly (with the
options that make the attention dense). A resumed run is the one exception: ``WanPipeline`` cannot
start in the middle of its schedule, so the remaining steps run in :func:`_denoise_remaining`.
``mode="pipeline"``: :func:`run_layer_pipeline` (DualParal), which cannot be a ``WanPipeline``
call: each block is at its own step, each rank runs only some of the blocks, and a block's input
includes another block's latents. It checkpoints each rank's part after every
``checkpoint_every`` iterations of the block schedule and resumes from the last iteration every
rank saved, with the same files, fingerprint and fallback rules as clip mode.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmaccel.parallel_video import checkpoint
from mmaccel.parallel_video.clip_parallel import ClipParallelConfig, apply_clip_parallel
from mmaccel.parallel_video.decode import decode_clip
from mmaccel.parallel_video.layer_pipeline import LayerPipelineConfig, block_sizes, run_layer_pipeline
from mmaccel.parallel_video.noise import frame_noise
from mmaccel.parallel_video.plan import latent_frame_count
from mmaccel.parallel_video.schedule import BlockSchedule, split_stages
from mmaccel.runtime.distributed import (
    DistContext,
    all_gather_varlen,
    exchange_neighbours,
    gather_to_main,
    init_distributed,
)
from mmaccel.runtime.limits import (
    Limits,
    check_step_eta,
    check_video_time,
    estimate_video_time,
    format_duration,
)
from mmaccel.runtime.paths import read_json_object
from mmaccel.runtime.pipelines import expert_for, pipeline_transformers

__all__ = [
    "LongVideoConfig", "LongVideoOutput", "StepEta", "VideoGeometry", "check_long_video", "check_video_time_of",
    "generate_long_video",
]  # fmt: skip

MODES = ("clip", "pipeline")


@dataclass(frozen=True)
class LongVideoConfig:
    """What to generate and how it is split.

    num_frames: video frames; ``num_frames - 1`` must be divisible by the VAE's temporal stride.
    mode: ``"clip"`` (clip parallelism with dual-scope attention, knobs in ``clip``) or
        ``"pipeline"`` (DualParal block-wise layer pipeline, knobs in ``pipeline``).
    decode_overlap: latent frames of left context each clip's VAE decode starts from (>= 1), or
        ``None`` for all preceding frames, which decodes exactly as the whole video at once (the
        Wan VAE's causal convolutions have a long temporal receptive field).
    checkpoint_dir: where each rank saves its state (``None``: no checkpoints): clip mode, its
        clip after every ``checkpoint_every`` steps; pipeline mode, its part of the layer pipeline
        after every ``checkpoint_every`` iterations of the block schedule (each one drains the
        pipeline briefly). ``resume=True`` continues from the last point every rank saved there.
        A folder holding checkpoints of an earlier run is refused (``ValueError``) unless
        ``resume=True`` or ``overwrite=True`` (rank 0 deletes every checkpoint there first).
    limits: the caps on ``num_inference_steps``, ``num_frames``, the prompts and the denoising
        time (``max_minutes``: a FLOP lower bound before any work, a measured step after it) (:class:`mmaccel.runtime.limits.Limits`); raise one explicitly, e.g.
        ``limits=Limits(max_steps=5000)``. Not part of a checkpoint's fingerprint.
    """

    prompt: str
    negative_prompt: str = ""
    num_frames: int = 81
    num_inference_steps: int = 50
    height: int = 480
    width: int = 832
    guidance_scale: float = 5.0
    seed: int = 0
    max_sequence_length: int = 512
    mode: str = "clip"
    clip: ClipParallelConfig = field(default_factory=ClipParallelConfig)
    pipeline: LayerPipelineConfig = field(default_factory=LayerPipelineConfig)
    decode_overlap: int | None = 1
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    resume: bool = False
    overwrite: bool = False
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name, low in (("num_frames", 1), ("num_inference_steps", 1), ("height", 1), ("width", 1),
                          ("max_sequence_length", 1), ("decode_overlap", 1), ("checkpoint_every", 1)):  # fmt: skip
            value = getattr(self, name)
            if name == "decode_overlap" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a number >= 0, got {type(self.guidance_scale).__name__}")
        if not 0 <= self.guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if not isinstance(self.clip, ClipParallelConfig):
            raise TypeError(f"clip must be a ClipParallelConfig, got {type(self.clip).__name__}")
        if not isinstance(self.pipeline, LayerPipelineConfig):
            raise TypeError(f"pipeline must be a LayerPipelineConfig, got {type(self.pipeline).__name__}")
        for name in ("resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.resume and self.overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other: continue the earlier run or start over")
        if (self.resume or self.overwrite) and self.checkpoint_dir is None:
            raise ValueError(f"{'resume' if self.resume else 'overwrite'}=True needs checkpoint_dir")
        if not isinstance(self.limits, Limits):
            raise TypeError(f"limits must be a mmaccel.runtime.limits.Limits, got {type(self.limits).__name__}")
        self.limits.steps(self.num_inference_steps, "num_inference_steps", "limits=Limits(max_steps=N)")
        self.limits.frames(self.num_frames, "num_frames", "limits=Limits(max_frames=N)")
        self.limits.prompt(self.prompt)
        self.limits.prompt(self.negative_prompt, "negative_prompt", allow_empty=True)


@dataclass
class LongVideoOutput:
    """``frames`` ``(F, H, W, 3)`` float in [0, 1] and ``latents`` ``(1, C, f, h, w)`` on rank 0
    (``None`` elsewhere); ``stats`` on every rank (timings, bytes communicated, resumed step)."""

    frames: np.ndarray | None
    latents: torch.Tensor | None
    stats: dict[str, Any]


def _fingerprint(pipe: Any, config: LongVideoConfig, world_size: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the settings that change the result."""
    run_only = ("checkpoint_dir", "checkpoint_every", "resume", "overwrite", "limits")
    settings = {k: v for k, v in asdict(config).items() if k not in run_only}
    public = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    model = json.dumps(public, sort_keys=True, default=str)
    return {
        "settings": json.dumps(settings, sort_keys=True),
        "transformer": hashlib.sha256(model.encode()).hexdigest(),
        "world_size": world_size,
    }


@dataclass(frozen=True)
class VideoGeometry:
    """What validation needs from a Wan pipeline, readable without loading any weights."""

    temporal_stride: int
    spatial_stride: int
    patch_size: tuple[int, int, int]
    num_layers: int
    transformer: str = "WanTransformer3DModel"
    #: the pipeline's transformers (Wan 2.2 A14B: ``transformer``, ``transformer_2``) and their switch
    experts: tuple[str, ...] = ("transformer",)
    boundary_ratio: float | None = None

    @classmethod
    def of(cls, pipe: Any) -> VideoGeometry:
        """The geometry of a loaded ``WanPipeline``."""
        experts = pipeline_transformers(pipe)
        tr = next(iter(experts.values()))
        return cls(
            pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial, tuple(tr.config.patch_size),
            len(tr.blocks), type(tr).__name__, tuple(experts), pipe.config.get("boundary_ratio"),
        )  # fmt: skip

    def describe(self) -> str:
        """One line naming the experts found, e.g. for ``mmaccel video``'s log."""
        if len(self.experts) == 1:
            return f"one transformer ({self.experts[0]}), {self.num_layers} blocks"
        boundary = f"t >= {self.boundary_ratio * 1000:g}" if self.boundary_ratio is not None else "no boundary_ratio"
        return (f"Wan 2.2 experts: {self.experts[0]} (high noise, {boundary}) and {', '.join(self.experts[1:])} "
                f"(low noise), {self.num_layers} blocks each")  # fmt: skip

    @classmethod
    def from_folder(cls, folder: str | Path) -> VideoGeometry:
        """The geometry of a saved ``WanPipeline`` folder, from its ``config.json`` files only."""
        folder = Path(folder)
        configs = {}
        for part in ("transformer", "vae"):
            path = folder / part / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: --model must be a saved WanPipeline folder")
            configs[part] = read_json_object(path)
        downsample = configs["vae"].get("temperal_downsample", [False, True, True])
        tr = configs["transformer"]
        index_path = folder / "model_index.json"
        index = read_json_object(index_path) if index_path.is_file() else {}
        if index.get("_class_name", "WanPipeline") != "WanPipeline":
            raise ValueError(f"--model must be a text-to-video WanPipeline folder, got a {index['_class_name']}")
        experts = ("transformer", "transformer_2") if (index.get("transformer_2") or [None])[0] else ("transformer",)
        if len(experts) == 2 and not (folder / "transformer_2" / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'transformer_2' / 'config.json'} not found (model_index.json names it)")
        spatial = configs["vae"].get("scale_factor_spatial") or 2 ** len(downsample)  # TI2V-5B's VAE: 16
        return cls(
            2 ** sum(bool(d) for d in downsample), int(spatial), tuple(tr.get("patch_size", (1, 2, 2))),
            int(tr.get("num_layers", 30)), str(tr.get("_class_name", "WanTransformer3DModel")), experts,
            index.get("boundary_ratio"),
        )  # fmt: skip


def check_long_video(pipe: Any, config: LongVideoConfig, world_size: int) -> None:
    """Validate ``config`` for ``pipe`` (a ``WanPipeline`` or a :class:`VideoGeometry`) on
    ``world_size`` ranks, without communicating and without running the model.

    ``ValueError`` names the offending setting: frames not matching the VAE's temporal stride,
    sizes the patching cannot take, more ranks than latent frames (clip) or blocks (pipeline),
    padding or decode overlap larger than a clip.
    """
    geometry = pipe if isinstance(pipe, VideoGeometry) else VideoGeometry.of(pipe)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    num_latent, _, _ = _check_geometry(geometry, config)
    if config.mode == "pipeline":
        split_stages(geometry.num_layers, world_size)
        return
    plan = config.clip.plan(num_latent, world_size)
    shortest = min(e - s for s, e in plan.clips)
    if world_size > 1 and config.decode_overlap is not None and config.decode_overlap > shortest:
        raise ValueError(
            f"decode_overlap={config.decode_overlap} is larger than the shortest clip ({shortest} latent frames)"
        )


def _check_geometry(geometry: VideoGeometry, config: LongVideoConfig) -> tuple[int, int, int]:
    """Latent frames, height and width; ``ValueError`` for sizes the VAE/patching cannot take."""
    if geometry.transformer != "WanTransformer3DModel":
        raise TypeError(f"generate_long_video supports WanPipeline, got a {geometry.transformer}")
    if geometry.patch_size[0] != 1:
        raise ValueError(f"parallel video needs a temporal patch size of 1, got {geometry.patch_size}")
    frames = latent_frame_count(config.num_frames, geometry.temporal_stride)
    multiple = geometry.spatial_stride * geometry.patch_size[1]
    for name in ("height", "width"):
        if getattr(config, name) % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple}, got {getattr(config, name)}")
    spatial = geometry.spatial_stride
    return frames, config.height // spatial, config.width // spatial


def _resume_step(ctx: DistContext, directory: Path, kind: str = "clip") -> int:
    """The last step (clip mode) or iteration (pipeline mode) every rank has an intact
    checkpoint for (0: start from noise)."""
    def warn(message: str) -> None:
        print(f"mmaccel video: warning: rank {ctx.rank}: {message}", file=sys.stderr)

    latest = checkpoint.newest_loadable_step(directory, ctx.rank, ctx.world_size, warn, kind)
    everyone = all_gather_varlen(ctx, torch.tensor([latest], device=ctx.device))
    return int(min(int(t[0]) for t in everyone))


#: Shortest communication timeout :class:`StepTimeout` sets, and the step times it allows.
MIN_TIMEOUT_S, TIMEOUT_STEPS = 30.0, 4


class StepTimeout:
    """Ties ``ctx.timeout_s`` to the measured step time: after every step (or checkpointed block
    schedule iteration) it becomes ``TIMEOUT_STEPS`` x the slowest step so far, at least
    ``MIN_TIMEOUT_S``, so a hung peer is noticed within a few step times instead of a fixed two
    minutes. The first step (warm-up included) counts, so it never undercuts a slow start."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx, self.slowest, self.last = ctx, 0.0, time.perf_counter()

    def step(self, steps: int = 1) -> None:
        now = time.perf_counter()
        self.slowest = max(self.slowest, (now - self.last) / max(1, steps))
        self.last = now
        # DistContext is frozen so that no helper changes it by accident; the timeout is the one
        # field meant to follow the run (every wait reads ctx.timeout_s when it starts)
        object.__setattr__(self.ctx, "timeout_s", max(MIN_TIMEOUT_S, TIMEOUT_STEPS * self.slowest))


#: How the time limit is raised, as the CLI and the Python API name it.
_MINUTES_FLAG = "--max-minutes (limits=Limits(max_minutes=N))"


def check_video_time_of(pipe: Any, config: LongVideoConfig, world_size: int, device: Any) -> None:
    """``ValueError`` when even a FLOP lower bound of the denoising on one of ``world_size`` ranks
    (:func:`mmaccel.runtime.limits.estimate_video_time`) exceeds ``config.limits.max_minutes``."""
    geometry = VideoGeometry.of(pipe)
    transformer = next(iter(pipeline_transformers(pipe).values()))
    estimate = estimate_video_time(
        config.num_frames, config.height, config.width, dict(transformer.config),
        steps=config.num_inference_steps, temporal_stride=geometry.temporal_stride,
        spatial_stride=geometry.spatial_stride, ranks=world_size, guidance=config.guidance_scale > 1,
        text_tokens=config.max_sequence_length, device=device, dtype_bytes=transformer.dtype.itemsize,
    )  # fmt: skip
    check_video_time(estimate, config.limits.max_minutes, flag=_MINUTES_FLAG,
                     hint="num_inference_steps, num_frames, height or width")  # fmt: skip


class StepEta:
    """The ETA of a run (fresh or resumed) from its second measured span, timed alone: the first
    carries the text encoding and the warm-up (on the zoo video model on CPU it took 3.2-3.4x a
    later step). :meth:`step` is called with the work done so far, in ``unit`` s (clip mode:
    denoising steps, after each; pipeline mode: work items of the block schedule, at each
    checkpoint). The slowest rank's time per unit (one gather, so the ranks agree) times the
    units left is the ETA, printed on rank 0 when ``report``; when the time so far plus the ETA
    exceeds ``limits.max_minutes`` every rank stops with one ``ValueError``, the checkpoints kept."""

    def __init__(self, ctx: DistContext, config: LongVideoConfig, total: int, report: bool, unit: str = "step") -> None:
        self.ctx, self.config, self.total, self.report, self.unit = ctx, config, total, report, unit
        self.began = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    @property
    def pending(self) -> bool:
        """Whether :meth:`step` still measures (after the second call it does nothing)."""
        return len(self.marks) < 2

    def step(self, done: int, stats: dict[str, Any]) -> None:
        if not self.pending:
            return
        self.marks.append((time.perf_counter(), done))
        if len(self.marks) != 2:
            return
        (before, done_before), (now, _) = self.marks
        per_unit = (now - before) / max(1, done - done_before)
        measured = torch.tensor([per_unit, now - self.began], dtype=torch.float64, device=self.ctx.device)
        slowest, elapsed = torch.stack(all_gather_varlen(self.ctx, measured)).amax(0).tolist()
        remaining = self.total - done
        directory = self.config.checkpoint_dir
        hint = (f"the finished steps are kept in {directory!r}: continue with --resume (resume=True) and the raised "
                "limit") if directory else None  # fmt: skip
        eta = check_step_eta(elapsed, slowest, remaining, self.config.limits.max_minutes, flag=_MINUTES_FLAG,
                             hint=hint, unit=self.unit)  # fmt: skip
        stats.update(step_s=slowest, eta_s=eta)
        if self.report and remaining:
            tqdm.write(f"a {self.unit} takes {slowest:.2f} s: about {format_duration(eta)} for the remaining "
                       f"{remaining} {self.unit}(s) (limit {self.config.limits.max_minutes:,} min)",
                       file=sys.stderr)  # fmt: skip


def _start_fresh(ctx: DistContext, directory: Path, config: LongVideoConfig, kind: str) -> None:
    """A run that does not resume: with ``overwrite``, every rank deletes its own checkpoints and
    rank 0 every checkpoint in the folder; without it, a folder holding an earlier run's
    checkpoints is refused on every rank (``ValueError`` naming ``resume=True`` and
    ``overwrite=True``). One gather makes the ranks agree and orders the deletion before any save."""
    refused: ValueError | None = None
    if config.overwrite:
        checkpoint.clear(directory, ctx.rank, ctx.world_size, kind)
        if ctx.is_main:
            checkpoint.clear_all(directory)
    else:
        try:
            checkpoint.check_fresh_start(directory, flag="checkpoint_dir", resume="resume=True",
                                         overwrite="overwrite=True")  # fmt: skip
        except ValueError as err:
            refused = err
    found = all_gather_varlen(ctx, torch.tensor([refused is not None], dtype=torch.int32, device=ctx.device))
    if refused is not None:
        raise refused
    if any(int(t[0]) for t in found):
        raise ValueError(f"checkpoint_dir {str(directory)!r}: another rank found an earlier run's checkpoints there; "
                         "continue it with resume=True, or start over with overwrite=True")  # fmt: skip


@torch.no_grad()
def generate_long_video(
    pipe: Any,
    config: LongVideoConfig,
    ctx: DistContext | None = None,
    *,
    progress: bool = True,
    timeout_from_steps: bool = False,
) -> LongVideoOutput:
    """Generate ``config.num_frames`` frames with ``pipe`` (a diffusers ``WanPipeline``) on all ranks.

    Call on every rank (``torchrun``/``accelerate launch``) with the same arguments; ``ctx`` defaults
    to :func:`init_distributed`. A progress bar is shown on rank 0 only. ``timeout_from_steps``:
    after each step, set ``ctx.timeout_s`` from the measured step time (:class:`StepTimeout`).

    Before any work, a FLOP lower bound of the denoising must fit ``config.limits.max_minutes``
    (:func:`check_video_time_of`) and ``config.checkpoint_dir`` must hold no earlier run's
    checkpoints unless ``config.resume`` or ``config.overwrite``; after the second step (clip
    mode; pipeline mode: the second checkpoint, so only with ``checkpoint_dir``) the measured time
    gives the ETA (``stats["eta_s"]``, printed when ``progress``), which must fit the same limit
    (:class:`StepEta`). Each is one ``ValueError`` on every rank.
    """
    ctx = ctx or init_distributed()
    check_long_video(pipe, config, ctx.world_size)
    check_video_time_of(pipe, config, ctx.world_size, ctx.device)
    clock = StepTimeout(ctx) if timeout_from_steps and ctx.world_size > 1 else None
    if config.mode == "pipeline":
        return _generate_pipelined(pipe, config, ctx, progress, clock)
    num_latent, latent_h, latent_w = _check_geometry(VideoGeometry.of(pipe), config)
    handle = apply_clip_parallel(  # on every transformer of the pipeline (Wan 2.2: both experts)
        pipe, config.clip, ctx=ctx, num_latent_frames=num_latent,
        current_timestep_callback=lambda: pipe.current_timestep,
    )  # fmt: skip
    start, end = config.clip.plan(num_latent, ctx.world_size).clips[ctx.rank]
    stats: dict[str, Any] = {"clip": (start, end), "latent_frames": num_latent, "resumed_from_step": 0}
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    try:
        channels = pipe.transformer.config.in_channels
        latents = frame_noise(config.seed, range(start, end), (channels, latent_h, latent_w), device=ctx.device)
        directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        meta = _fingerprint(pipe, config, ctx.world_size)
        first = 0
        if directory is not None and config.resume:
            first = _resume_step(ctx, directory)
        elif directory is not None:
            _start_fresh(ctx, directory, config, "clip")
        stats["resumed_from_step"] = first
        eta = StepEta(ctx, config, config.num_inference_steps, report=progress and ctx.is_main)

        def save(step: int, scheduler: Any, current: torch.Tensor) -> None:
            if clock is not None:
                clock.step()
            if directory is not None and (step % config.checkpoint_every == 0 or step == config.num_inference_steps):
                checkpoint.save_step(directory, ctx.rank, ctx.world_size, step, current, scheduler, meta)
            eta.step(step, stats)

        def on_step_end(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            save(i + 1, pipeline.scheduler, kwargs["latents"])
            return {}

        began = time.perf_counter()
        if first:
            latents = _denoise_remaining(pipe, config, ctx, directory, first, meta, save, progress)
        else:
            pipe.set_progress_bar_config(disable=not (progress and ctx.is_main), desc="denoising")
            latents = pipe(
                prompt=config.prompt, negative_prompt=config.negative_prompt, height=config.height,
                width=config.width, num_frames=(end - start - 1) * pipe.vae_scale_factor_temporal + 1,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                latents=latents, output_type="latent", max_sequence_length=config.max_sequence_length,
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
            ).frames  # fmt: skip
        experts = {attr: s.summary() for attr, s in handle.stats.experts.items()}
        ran = [s for s in experts.values() if s["calls"]]
        stats.update(
            denoise_s=time.perf_counter() - began,
            steps_run=config.num_inference_steps - first,
            **{key: sum(s[key] for s in experts.values()) for key in ("sent_bytes", "recv_bytes", "comm_wait_s")},
            attention_calls=sum(s["calls"] for s in experts.values()),
            expert_calls={attr: s["calls"] for attr, s in experts.items()},
            key_frames_per_query=ran[0]["key_frames_per_query"] if ran else None,
        )
    finally:
        handle.remove()
        pipe._progress_bar_config = bar_config

    began = time.perf_counter()
    if config.decode_overlap is None:
        previous = all_gather_varlen(ctx, latents.movedim(2, 0).contiguous())[: ctx.rank]
        left = torch.cat(previous).movedim(0, 2) if previous else None
    else:
        tail = latents[:, :, end - start - config.decode_overlap :].contiguous()
        left, _ = exchange_neighbours(ctx, None, tail)
    frames = decode_clip(pipe, latents, left)
    stats["decode_s"] = time.perf_counter() - began
    all_frames = gather_to_main(ctx, torch.from_numpy(np.ascontiguousarray(frames)))
    all_latents = gather_to_main(ctx, latents.movedim(2, 0).contiguous())
    if not ctx.is_main:
        return LongVideoOutput(None, None, stats)
    video = torch.cat(all_frames).numpy()
    return LongVideoOutput(video, torch.cat(all_latents).movedim(0, 2), stats)


def _denoise_remaining(
    pipe: Any, config: LongVideoConfig, ctx: DistContext, directory: Path, first: int, meta: dict[str, Any],
    save: Any, progress: bool,
) -> torch.Tensor:
    """Resume: steps ``first + 1 ..`` from the checkpoint of step ``first``.

    ``WanPipeline`` has no way to start in the middle of its schedule, so this repeats its step
    (text encoding through ``pipe.encode_prompt``, two transformer calls, CFG, ``scheduler.step``)
    for the remaining steps only; tests check it writes the same video as an uninterrupted run.
    """
    saved, sched = checkpoint.load_step(directory, ctx.rank, ctx.world_size, first, meta)
    latents = saved.to(ctx.device)
    transformers, scheduler = pipeline_transformers(pipe), pipe.scheduler
    dtype = next(iter(transformers.values())).dtype
    do_cfg = config.guidance_scale > 1.0
    cond, uncond = pipe.encode_prompt(
        prompt=config.prompt, negative_prompt=config.negative_prompt, do_classifier_free_guidance=do_cfg,
        max_sequence_length=config.max_sequence_length, device=ctx.device,
    )  # fmt: skip
    scheduler.set_timesteps(config.num_inference_steps, device=ctx.device)
    scheduler.set_begin_index(0)
    checkpoint.restore_scheduler(scheduler, sched)
    timesteps = scheduler.timesteps
    experts = [expert_for(pipe, t) for t in timesteps.tolist()]  # Wan 2.2: switch at boundary_ratio
    bar = tqdm(total=len(timesteps), initial=first, desc="denoising", disable=not (progress and ctx.is_main))
    for i in range(first, len(timesteps)):
        t = timesteps[i]
        transformer = transformers[experts[i]]
        pipe._current_timestep = t
        model_input = latents.to(dtype)
        timestep = t.expand(latents.shape[0])
        noise = transformer(
            hidden_states=model_input, timestep=timestep, encoder_hidden_states=cond.to(dtype), return_dict=False
        )[0]
        if do_cfg:
            noise_uncond = transformer(
                hidden_states=model_input, timestep=timestep, encoder_hidden_states=uncond.to(dtype),
                return_dict=False,
            )[0]  # fmt: skip
            noise = noise_uncond + config.guidance_scale * (noise - noise_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        save(i + 1, scheduler, latents)
        bar.update()
    bar.close()
    pipe._current_timestep = None
    return latents


def _generate_pipelined(
    pipe: Any, config: LongVideoConfig, ctx: DistContext, progress: bool, clock: StepTimeout | None = None
) -> LongVideoOutput:
    """``mode="pipeline"``: DualParal over the ranks' layer stages; rank 0 decodes the whole video."""
    num_latent, latent_h, latent_w = _check_geometry(VideoGeometry.of(pipe), config)
    do_cfg = config.guidance_scale > 1.0
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        do_classifier_free_guidance=do_cfg,
        max_sequence_length=config.max_sequence_length,
        device=ctx.device,
    )
    text = torch.cat([prompt_embeds, negative_embeds]) if do_cfg else prompt_embeds
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    meta = _fingerprint(pipe, config, ctx.world_size)
    first, state = 0, None
    if directory is not None and config.resume:
        first = _resume_step(ctx, directory, "pipeline")
        if first:
            state = checkpoint.load_iteration(directory, ctx.rank, ctx.world_size, first, meta)
    elif directory is not None:
        _start_fresh(ctx, directory, config, "pipeline")

    schedule = BlockSchedule(len(block_sizes(num_latent, config.pipeline.frames_per_block)),
                             config.num_inference_steps, config.pipeline.order)  # as run_layer_pipeline builds it
    eta = StepEta(ctx, config, len(schedule.order()), report=progress and ctx.is_main, unit="pipeline item")
    eta_stats: dict[str, Any] = {}

    def save(iteration: int, rank_state: dict[str, Any]) -> None:
        if clock is not None:
            clock.step(config.checkpoint_every)
        checkpoint.save_iteration(directory, ctx.rank, ctx.world_size, iteration, rank_state, meta)
        if eta.pending:  # the items done so far, counted only while the ETA measures
            eta.step(sum(schedule.in_flight(k) for k in range(iteration)), eta_stats)

    latents, stats = run_layer_pipeline(
        pipe, ctx, config.pipeline, text=text.to(pipe.transformer.dtype), guidance_scale=config.guidance_scale,
        num_latent_frames=num_latent, latent_hw=(latent_h, latent_w), steps=config.num_inference_steps,
        seed=config.seed, progress=progress, on_checkpoint=save if directory is not None else None,
        checkpoint_every=config.checkpoint_every, resume=state,
    )  # fmt: skip
    stats.update(latent_frames=num_latent, resumed_from_step=first, **eta_stats)
    if not ctx.is_main:
        return LongVideoOutput(None, None, stats)
    began = time.perf_counter()
    frames = decode_clip(pipe, latents, None)
    stats["decode_s"] = time.perf_counter() - began
    return LongVideoOutput(frames, latents, stats)
