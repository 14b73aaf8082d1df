"""``mmaccel video``: long-video generation over all ranks of a ``torchrun`` / ``accelerate`` launch.

    torchrun --nproc-per-node 2 -m mmaccel.apps.cli video --model tiny --prompt "a red car" \\
        --frames 33 --steps 4 --out car.mp4

    mmaccel video --nproc-per-node 2 --model tiny --prompt "a red car" --frames 33 --steps 4 --out car.mp4

Every rank runs the same command; rank 0 shows the progress bar and writes the video (MP4, GIF or
PNG frames, :mod:`mmaccel.apps.video_output`: the format is checked before any work, the file
written atomically and read back before ``wrote`` is printed). Each rank checkpoints its state in
``--checkpoint-dir`` (default ``<out>.parts``): its clip after every step in ``--mode clip``; its
part of the DualParal layer pipeline after every iteration of the block schedule in ``--mode
pipeline`` (both every ``--checkpoint-every``). A killed run continues with ``--resume`` and
writes the identical video; a folder holding checkpoints is refused without ``--resume`` or
``--overwrite``. Every argument is checked against :class:`mmaccel.runtime.limits.Limits`, the
memory estimate and a FLOP lower bound of the time (``--max-minutes``) before any model loads; the
second step's measured time (pipeline mode: per item between the first two checkpoints) gives an
ETA, checked against the same limit. A user error is one line from rank 0, exit 2.
``--nproc-per-node N`` starts the ranks without torchrun (:mod:`mmaccel.apps.launch`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from mmaccel.apps.video_output import VIDEO_FORMATS, check_video_output, write_video
from mmaccel.parallel_video.checkpoint import check_fresh_start, clear_all
from mmaccel.parallel_video.clip_parallel import ClipParallelConfig
from mmaccel.parallel_video.generate import (
    LongVideoConfig,
    VideoGeometry,
    check_long_video,
    generate_long_video,
)
from mmaccel.parallel_video.layer_pipeline import LayerPipelineConfig
from mmaccel.runtime.checkpoint_io import check_weight_files, write_error
from mmaccel.runtime.distributed import destroy_distributed, init_distributed
from mmaccel.runtime.limits import (
    MAX_FRAMES,
    MAX_MINUTES,
    MAX_STEPS,
    Limits,
    check_video_memory,
    check_video_time,
    estimate_video_memory,
    estimate_video_time,
    read_video_model_config,
)
from mmaccel.runtime.paths import check_output_dir
from mmaccel.testing import TINY_WAN_TRANSFORMER

__all__ = ["add_video_parser", "check_arguments", "run_video", "write_video"]

#: Communication timeout until the first step is measured (rendezvous, model load, first step).
DEFAULT_START_TIMEOUT_S = 120.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TINY_DEFAULTS = {"height": 64, "width": 96, "max_sequence_length": 32}
_REAL_DEFAULTS = {"height": 480, "width": 832, "max_sequence_length": 512}
_ZOO_DEFAULTS = {"height": 64, "width": 64, "max_sequence_length": 512}  # mmaccel.apps.zoo.moving_digits


def add_video_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``video`` command to an ``argparse`` subparsers object (sets ``func=run_video``)."""
    p = subparsers.add_parser(
        "video",
        help="long video generation over all ranks (launch with torchrun)",
        description="Generate a long video with a Wan pipeline over all ranks: one clip per rank with "
        "dual-scope attention (--mode clip, Video-Infinity) or one layer stage per rank (--mode pipeline, "
        "DualParal). Launch with `torchrun --nproc-per-node N` or "
        "`accelerate launch --multi_gpu --num_processes N -m mmaccel.apps.cli video ...`.",
    )
    p.add_argument(
        "--model", default="tiny",
        help="WanPipeline folder (Wan 2.1, or Wan 2.2 with both experts transformer and transformer_2), "
        "'tiny' (built-in random tiny model) or 'zoo' (the trained moving-digits model)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, default=81,
                   help=f"video frames; frames - 1 divisible by 4 (Wan VAE); at most --max-frames ({MAX_FRAMES})")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, help=f"denoising steps; at most --max-steps ({MAX_STEPS})")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help=f"raise the --steps limit (default {MAX_STEPS})")
    p.add_argument("--max-frames", type=int, default=MAX_FRAMES, help=f"raise the --frames limit (default {MAX_FRAMES})")
    p.add_argument("--max-minutes", type=int, default=MAX_MINUTES,
                   help=f"limit on the denoising time per rank, checked before any work (a FLOP lower bound) and "
                   f"after the second step (its measured time x the steps left); default {MAX_MINUTES}")  # fmt: skip
    p.add_argument("--mode", choices=("clip", "pipeline"), default="clip",
                   help="clip: clip parallelism (Video-Infinity); pipeline: block-wise layer pipeline (DualParal)")  # fmt: skip
    p.add_argument("--height", type=int, default=None, help="default 64 for tiny and zoo, 480 otherwise")
    p.add_argument("--width", type=int, default=None, help="default 96 for tiny, 64 for zoo, 832 otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument(
        "--max-sequence-length", type=int, default=None, help="text tokens; 32 for tiny, 512 otherwise"
    )
    p.add_argument("--padding", type=int, default=None,
                   help="clip mode: latent frames of K/V from each neighbour, half width of the local band (default 1)")  # fmt: skip
    p.add_argument("--global-frames", type=int, default=None,
                   help="clip mode: global-scope latent frames (reference top_k; default 4)")  # fmt: skip
    p.add_argument("--phase-bias", type=float, default=None,
                   help="clip mode: logit bonus to local keys below --phase-boundary, to global keys above (default 10)")  # fmt: skip
    p.add_argument("--phase-boundary", type=float, default=None, help="clip mode: timestep of the switch (default 850)")
    p.add_argument("--local-scope", choices=("band", "window"), default=None,
                   help="clip mode: band = 2*padding+1 frames around each query frame (reference, default); "
                   "window = the whole clip plus both halos")  # fmt: skip
    p.add_argument("--end-keys", choices=("zeros", "none"), default=None,
                   help="clip mode: zero K/V frames at the video ends (reference, default) or none")  # fmt: skip
    p.add_argument("--global-sampling", choices=("clip_stride", "uniform"), default=None,
                   help="clip mode: frames at a stride in every clip (reference, default) or evenly over the video")  # fmt: skip
    p.add_argument("--decode-overlap", type=_overlap, default=1,
                   help="latent frames of left context per clip decode, or 'all' (exact, slower on later ranks)")  # fmt: skip
    p.add_argument("--frames-per-block", type=int, default=None,
                   help="pipeline mode: largest block in latent frames; the video splits into balanced blocks (default 10)")  # fmt: skip
    p.add_argument("--num-cat", type=int, default=None,
                   help="pipeline mode: context frames from each neighbouring block (default 5)")  # fmt: skip
    p.add_argument("--context", choices=("reference", "prev_kv"), default=None,
                   help="pipeline mode: reference = previous block's last latents as input + next block's "
                   "first frames as cached K/V (default); prev_kv = previous block's cached K/V only")  # fmt: skip
    p.add_argument("--order", choices=("newest_first", "oldest_first"), default=None,
                   help="pipeline mode: which block of an iteration runs first (default newest_first)")  # fmt: skip
    p.add_argument("--tail-lag", type=int, choices=(0, 1), default=None,
                   help="pipeline mode: 1 = feed the previous block's latents one update older, so rank 0 never "
                   "waits for the last rank (default 0)")  # fmt: skip
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--out", default="video.mp4",
                   help=f"written by rank 0, checked before any work: {', '.join(VIDEO_FORMATS)} (PNG: one file per frame)")  # fmt: skip
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-rank checkpoints, both modes (default: <out>.parts)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="checkpoint every N denoising steps (clip mode) or schedule iterations (pipeline mode; "
                   "each checkpoint briefly drains the pipeline)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its checkpoints (same settings and rank count)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="start over, deleting the checkpoints an earlier run left in --checkpoint-dir")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds any communication may wait (default: 4 measured step times, at least 30 s)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start N ranks on this machine (torch's launcher, in-process) instead of torchrun: a "
                   "failure ends with the ranks' one line and exit status (2 for a user error), no launcher report")  # fmt: skip
    p.set_defaults(func=run_video)
    return p


def _overlap(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'all', got {text!r}") from None


_CLIP_ARGS = ("padding", "global_frames", "phase_bias", "phase_boundary", "local_scope", "end_keys", "global_sampling")
_PIPELINE_ARGS = ("frames_per_block", "num_cat", "context", "order", "tail_lag")
# the built-in tiny model (mmaccel.testing.tiny_wan_pipeline): known without building it
_TINY_GEOMETRY = VideoGeometry(temporal_stride=4, spatial_stride=8, patch_size=(1, 2, 2), num_layers=4)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options the user gave (the rest keep the config's reference defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _model_folder(model: str) -> Path | None:
    """The pipeline folder ``--model`` names (``None`` for the built-in tiny model)."""
    if model == "tiny":
        return None
    if model == "zoo":
        from mmaccel.apps.zoo import zoo_path  # the trained moving-digits reference model

        return zoo_path("moving-digits")
    if not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model!r} is neither 'tiny', 'zoo' nor a local WanPipeline folder")
    return Path(model)


def check_arguments(args: argparse.Namespace, world_size: int | None = None) -> LongVideoConfig:
    """Every check that needs no model weights and no process group: the config, the model's
    geometry (from its ``config.json`` files) and the split over ``world_size`` ranks (default
    ``WORLD_SIZE``)."""
    limits = Limits(
        max_steps=_limit("--max-steps", args.max_steps), max_frames=_limit("--max-frames", args.max_frames),
        max_minutes=_limit("--max-minutes", args.max_minutes),
    )  # fmt: skip
    limits.steps(args.steps, "--steps", "--max-steps")
    limits.frames(args.frames, "--frames", "--max-frames")
    limits.prompt(args.prompt, "--prompt")
    limits.prompt(args.negative_prompt, "--negative-prompt", allow_empty=True)
    if args.timeout is not None and not (args.timeout > 0 and args.timeout < float("inf")):
        raise ValueError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if args.fps < 1:
        raise ValueError(f"--fps must be an int >= 1, got {args.fps}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the earlier run or start over")
    check_video_output(args.out, flag="--out")
    config = _config(args, limits)
    folder = _model_folder(args.model)
    geometry = _TINY_GEOMETRY if folder is None else VideoGeometry.from_folder(folder)
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int, got {os.environ['WORLD_SIZE']!r}") from None
    if config.checkpoint_dir:
        check_output_dir(config.checkpoint_dir, flag="--checkpoint-dir")
        if not args.resume and not args.overwrite:
            check_fresh_start(Path(config.checkpoint_dir), flag="--checkpoint-dir")
    if folder is None:
        transformer, temporal, spatial = TINY_WAN_TRANSFORMER, geometry.temporal_stride, geometry.spatial_stride
    else:
        transformer, temporal, spatial = read_video_model_config(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = dict(temporal_stride=temporal, spatial_stride=spatial, ranks=world_size,
                 dtype_bytes=_DTYPES[args.dtype].itemsize, guidance=config.guidance_scale > 1,
                 steps=config.num_inference_steps)  # fmt: skip
    check_video_memory(estimate_video_memory(config.num_frames, config.height, config.width, transformer, **sizes),
                       device)  # fmt: skip
    check_video_time(estimate_video_time(config.num_frames, config.height, config.width, transformer, **sizes,
                                         text_tokens=config.max_sequence_length, device=device), limits.max_minutes)  # fmt: skip
    check_long_video(geometry, config, world_size)
    if folder is not None:
        check_weight_files(folder, flag="--model")
    return config


def _limit(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be an int >= 1, got {value!r}")
    return value


def _config(args: argparse.Namespace, limits: Limits | None = None) -> LongVideoConfig:
    defaults = {"tiny": _TINY_DEFAULTS, "zoo": _ZOO_DEFAULTS}.get(args.model, _REAL_DEFAULTS)
    out = Path(args.out)
    checkpoints = args.checkpoint_dir or str(out.with_name(out.name + ".parts"))
    return LongVideoConfig(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        height=args.height if args.height is not None else defaults["height"],
        width=args.width if args.width is not None else defaults["width"],
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        max_sequence_length=args.max_sequence_length or defaults["max_sequence_length"],
        mode=args.mode,
        clip=ClipParallelConfig(**_given(args, _CLIP_ARGS)),
        decode_overlap=args.decode_overlap,
        pipeline=LayerPipelineConfig(**_given(args, _PIPELINE_ARGS)),
        checkpoint_dir=checkpoints,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        overwrite=args.overwrite,
        limits=limits or Limits(),
    )


def _load(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    if model == "tiny":
        from mmaccel.testing import tiny_wan_pipeline  # built-in test model; apps owns the tiny builders

        pipe = tiny_wan_pipeline(device=device, dtype=dtype)
    else:
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(str(_model_folder(model)), dtype=dtype).to(device)
        if dtype != torch.float32:
            pipe.vae.to(torch.float32)  # the Wan VAE decodes in float32, as in diffusers' Wan examples
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _resume_hint(args: argparse.Namespace, config: LongVideoConfig) -> str | None:
    """What a lost peer's one line adds: where the finished steps are and how to continue."""
    if not config.checkpoint_dir:
        return None
    return (
        f"the finished steps are kept in {config.checkpoint_dir!r}; rerun the same command with --resume "
        "(and the same number of ranks) to continue"
    )


def _launch(args: argparse.Namespace) -> int:
    """``--nproc-per-node N``: check everything for N ranks first (one line, nothing started), then
    start them (:func:`mmaccel.apps.launch.launch_ranks`)."""
    from mmaccel.apps.launch import launch_ranks, without_flag

    if "RANK" in os.environ:
        raise ValueError("--nproc-per-node starts the ranks itself: drop it under torchrun / accelerate launch")
    nproc = _limit("--nproc-per-node", args.nproc_per_node)
    config = check_arguments(args, world_size=nproc)
    argv = without_flag(getattr(args, "argv", []), "--nproc-per-node")
    return launch_ranks(nproc, argv, command="mmaccel video", hint=_resume_hint(args, config))


def run_video(args: argparse.Namespace) -> int:
    """Run ``mmaccel video`` on this rank; returns the exit code (0 on success).

    Every argument is checked before any model loads or any process group forms, so a user error
    is one ``ValueError`` (printed once, by rank 0, as one line by ``mmaccel.apps.cli``; exit 2).
    """
    if getattr(args, "nproc_per_node", None) is not None:
        return _launch(args)
    config = check_arguments(args)
    if args.overwrite and config.checkpoint_dir and os.environ.get("RANK", "0") == "0":
        # before the group forms: no rank writes a checkpoint before rank 0 has joined it
        clear_all(Path(config.checkpoint_dir))
    ctx = init_distributed(timeout_s=args.timeout or DEFAULT_START_TIMEOUT_S)
    try:
        pipe = _load(args.model, ctx.device, _DTYPES[args.dtype])
        check_long_video(pipe, config, ctx.world_size)  # the loaded model agrees with its config files
        if ctx.is_main:  # Wan 2.2 A14B folders hold two experts: say which were found
            print(f"model: {VideoGeometry.of(pipe).describe()}", flush=True)
        with ctx.guard("mmaccel video", hint=_resume_hint(args, config)):
            result = generate_long_video(
                pipe, config, ctx, progress=not args.quiet, timeout_from_steps=args.timeout is None
            )
            if ctx.is_main:
                try:
                    path = write_video(result.frames, args.out, args.fps)
                except OSError as err:
                    raise write_error(err, args.out, result.frames.size) from None
                stats = result.stats
                print(
                    f"wrote {path}: {result.frames.shape[0]} frames {config.height}x{config.width}, "
                    f"{ctx.world_size} rank(s), denoise {stats['denoise_s']:.1f}s, decode {stats['decode_s']:.1f}s"
                    + (
                        f", resumed from {'iteration' if config.mode == 'pipeline' else 'step'} "
                        f"{stats['resumed_from_step']}"
                        if stats["resumed_from_step"]
                        else ""
                    )
                )
    finally:
        destroy_distributed(ctx)
    return 0
