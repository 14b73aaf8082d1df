"""Benchmark clip parallelism (Video-Infinity) and the layer pipeline (DualParal) against one process.

A Wan-shaped ``WanTransformer3DModel`` (random weights) runs one denoising forward over a video
of latent frames: in one process (the baseline), and on 2 ranks launched with ``torchrun`` (gloo
on CPU, NCCL on GPU), each rank its own clip. One compute thread per process, so a rank stands
for one device. Reported per rank, as ratios to the single process of the same video:

* wall time and peak activation memory (weights are replicated on every rank and not counted);
* "frames per rank at constant memory": a 2x longer video on 2 ranks vs the 1x video on one;
* K/V bytes received per denoising step (2 forwards, CFG) vs an all-gather of every frame's K/V;
* fidelity: relative L2 of the 2-rank output vs the dense output of the same video, and the PSNR
  of clip-wise VAE decoding (with overlap) vs decoding the whole latent video (tiny Wan VAE).

Second table, DualParal: a few denoising steps of the whole video with the block-wise schedule,
one process vs one layer stage per rank: time, activation memory, weights held, parity.

Fidelity of the algorithms (``--fidelity-only``; part of every run): the zoo's trained
``moving-digits`` WanPipeline generates an 81-frame video (21 latent frames, 4x its training
length) on 2 ranks with ``generate_long_video`` in both modes, with the reference defaults and with
each of our options; each is compared with the single-process full-attention run of the same
initial noise (the plain ``WanPipeline``): relative L2 of the final latents per latent frame (mean
and max over frames) and PSNR of the decoded frames (exact decode, ``decode_overlap=None``).

Last table, fidelity on a trained model: ``generate_long_video`` (clip mode) with the zoo's
``moving-digits`` WanPipeline, a video longer than it was trained on, on 2 ranks vs 1 process:
PSNR of the frames vs the single process, and the digit/direction accuracy of 17-frame windows
(zoo digit classifier + motion estimate) for both.

    .venv/bin/python -m mmaccel.benchmarks.bench_parallel_video --quick
    .venv/bin/python -m mmaccel.benchmarks.bench_parallel_video --write
    .venv/bin/python -m mmaccel.benchmarks.bench_parallel_video --fidelity-only --write
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mmaccel.benchmarks.harness import RESULTS_DIR, append_results, measure
from mmaccel.parallel_video import ClipParallelConfig, ClipPlan, apply_clip_parallel, decode_clip, frame_noise
from mmaccel.parallel_video.layer_pipeline import (
    LayerPipelineConfig,
    block_noise,
    block_sizes,
    run_layer_pipeline,
)
from mmaccel.parallel_video.schedule import split_stages
from mmaccel.runtime import metrics
from mmaccel.runtime.distributed import destroy_distributed, gather_to_main, init_distributed
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table

RESULTS = RESULTS_DIR / "parallel_video.md"
ROOT = Path(__file__).resolve().parents[1]
# Wan 2.1 block structure, scaled down: 4 heads x 64, FFN 4x, 4 blocks, 16 latent channels
MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
             text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=4, rope_max_seq_len=1024)  # fmt: skip
SIZES = {  # latent frames, latent height, latent width (tokens per frame = h/2 * w/2)
    "quick": dict(frames=8, height=16, width=24),
    "full": dict(frames=16, height=24, width=32),
}
TEXT_TOKENS = 32


def build_transformer(device: torch.device):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return WanTransformer3DModel(**MODEL).eval().to(device)


def inputs(frames: range, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    latents = frame_noise(0, frames, (MODEL["in_channels"], height, width), device=device)
    text = torch.randn(1, TEXT_TOKENS, MODEL["text_dim"], generator=torch.Generator().manual_seed(1)).to(
        device
    )
    return latents, torch.tensor([500.0], device=device), text


def kv_bytes_per_frame(height: int, width: int) -> int:
    """Bytes of one latent frame's K and V in one layer (float32)."""
    tokens = (height // 2) * (width // 2)
    return 2 * tokens * MODEL["num_attention_heads"] * MODEL["attention_head_dim"] * 4


def pipeline_worker(args: argparse.Namespace, ctx) -> None:
    """One rank of the DualParal layer pipeline: ``args.steps`` denoising steps of the whole video."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = SimpleNamespace(transformer=build_transformer(ctx.device), scheduler=scheduler)
    lo, hi = split_stages(MODEL["num_layers"], ctx.world_size)[ctx.rank]
    for i in range(MODEL["num_layers"]):  # a stage holds only its own blocks
        if not lo <= i < hi:
            pipe.transformer.blocks[i] = torch.nn.Identity()
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    text = torch.randn(2, TEXT_TOKENS, MODEL["text_dim"], generator=torch.Generator().manual_seed(1)).to(
        ctx.device
    )
    context, lag = ("reference", 1) if args.context == "reference_lag" else (args.context, 0)
    order = "newest_first" if context == "reference" else "oldest_first"
    config = LayerPipelineConfig(
        frames_per_block=args.frames_per_block, num_cat=1, context=context, order=order, tail_lag=lag
    )
    result: list[torch.Tensor | None] = []

    def run() -> None:
        result[:] = [
            run_layer_pipeline(
                pipe, ctx, config, text=text, guidance_scale=5.0, num_latent_frames=args.frames,
                latent_hw=(args.height, args.width), steps=args.steps, seed=0, progress=False,
            )[0]
        ]  # fmt: skip

    m = measure(run, 1, 1, ctx.device)
    row = torch.tensor([m.median_s, m.peak_bytes, weights, hi - lo], dtype=torch.float64, device=ctx.device)
    rows = gather_to_main(ctx, row.unsqueeze(0))
    if ctx.is_main:
        torch.save(result[0].cpu(), args.worker + ".pt")
        Path(args.worker).write_text(json.dumps([r[0].tolist() for r in rows]))


ZOO_TITLE = "Clip parallelism: fidelity on the moving-digits zoo model"
#: Prompts of the zoo fidelity run: (digit, direction).
ZOO_PROMPTS = [(3, "left"), (7, "down"), (0, "right"), (5, "up")]


def zoo_worker(args: argparse.Namespace, ctx) -> None:
    """One rank of ``generate_long_video`` on the `moving-digits` zoo model, for each prompt of
    `ZOO_PROMPTS` (the first ``args.prompts``); rank 0 saves the videos and per-prompt seconds."""
    from mmaccel.apps.zoo import moving_digits as md
    from mmaccel.parallel_video import LongVideoConfig, generate_long_video

    pipe = md.load(device=ctx.device)
    videos, seconds = [], []
    for digit, direction in ZOO_PROMPTS[: args.prompts]:
        config = LongVideoConfig(
            prompt=md.prompt_for(digit, direction), num_frames=args.frames, num_inference_steps=args.steps,
            height=md.SIZE, width=md.SIZE, guidance_scale=md.GUIDANCE_SCALE, seed=0,
            clip=ClipParallelConfig(padding=args.padding, global_frames=args.global_frames),
        )  # fmt: skip
        out = generate_long_video(pipe, config, ctx, progress=False)
        seconds.append(out.stats["denoise_s"] + out.stats["decode_s"])
        if ctx.is_main:
            videos.append(torch.from_numpy(out.frames).float().mean(-1))  # grey [F, H, W]
    if ctx.is_main:
        torch.save(torch.stack(videos), args.worker + ".pt")
        Path(args.worker).write_text(json.dumps(seconds))


FIDELITY_TITLE = "Fidelity vs full attention: reference defaults and options (moving-digits zoo model)"
FIDELITY_FRAMES = 81
#: (label, mode, ClipParallelConfig / LayerPipelineConfig keyword arguments)
FIDELITY_RUNS = [
    ("clip: reference defaults (band, zero end keys, clip-stride globals, bias 10 @ 850)", "clip", {}),
    ("clip: + end_keys='none'", "clip", dict(end_keys="none")),
    ("clip: + local_scope='window'", "clip", dict(local_scope="window")),
    ("clip: + global_sampling='uniform'", "clip", dict(global_sampling="uniform")),
    ("clip: all three options", "clip", dict(end_keys="none", local_scope="window", global_sampling="uniform")),
    ("clip: all three options, phase_bias=0", "clip",
     dict(end_keys="none", local_scope="window", global_sampling="uniform", phase_bias=0.0)),
    ("pipeline: reference defaults (prev tail input + next head K/V, newest first)", "pipeline", {}),
    ("pipeline: + tail_lag=1", "pipeline", dict(tail_lag=1)),
    ("pipeline: context='prev_kv', order='oldest_first'", "pipeline", dict(context="prev_kv", order="oldest_first")),
    ("pipeline: num_cat=0 (no context)", "pipeline", dict(num_cat=0)),
]  # fmt: skip


def _fidelity_config(md, prompt: str, mode: str, kwargs: dict, steps: int):
    from mmaccel.parallel_video import LongVideoConfig

    knobs = {"clip": ClipParallelConfig(**kwargs)} if mode == "clip" else {"pipeline": LayerPipelineConfig(**kwargs)}
    return LongVideoConfig(
        prompt=prompt, num_frames=FIDELITY_FRAMES, num_inference_steps=steps, height=md.SIZE, width=md.SIZE,
        guidance_scale=md.GUIDANCE_SCALE, seed=0, mode=mode, decode_overlap=None, **knobs,
    )  # fmt: skip


def fidelity_worker(args: argparse.Namespace, ctx) -> None:
    """One rank: every run of `FIDELITY_RUNS` for the first ``args.prompts`` prompts; rank 0 saves
    the final latents and decoded grey frames of each, and the seconds."""
    from mmaccel.apps.zoo import moving_digits as md
    from mmaccel.parallel_video import generate_long_video

    pipe = md.load(device=ctx.device)
    results = []
    for digit, direction in ZOO_PROMPTS[: args.prompts]:
        for _, mode, kwargs in FIDELITY_RUNS:
            config = _fidelity_config(md, md.prompt_for(digit, direction), mode, kwargs, args.steps)
            out = generate_long_video(pipe, config, ctx, progress=False)
            if ctx.is_main:
                grey = torch.from_numpy(out.frames).float().mean(-1)
                results.append((out.latents.cpu(), grey, out.stats["denoise_s"]))
    if ctx.is_main:
        torch.save(results, args.worker + ".pt")
        Path(args.worker).write_text("[]")


def fidelity(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
    """The `FIDELITY_RUNS` on ``args.ranks`` ranks vs the plain single-process pipeline."""
    from mmaccel.apps.zoo import moving_digits as md

    _, results = launch(args, args.ranks, FIDELITY_FRAMES, f"{tmp}/fid.json", "fidelity")
    pipe = md.load()
    pipe.set_progress_bar_config(disable=True)
    latent = (FIDELITY_FRAMES - 1) // 4 + 1
    channels, size = pipe.transformer.config.in_channels, md.SIZE // pipe.vae_scale_factor_spatial
    dense_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    per_run: dict[str, list[tuple[list[float], float, float, float]]] = {label: [] for label, _, _ in FIDELITY_RUNS}
    it = iter(results)
    for p, (digit, direction) in enumerate(ZOO_PROMPTS[: args.prompts]):
        for label, mode, kwargs in FIDELITY_RUNS:
            lat, grey, secs = next(it)
            noise_kind = "frame" if mode == "clip" else "block"
            if (p, noise_kind) not in dense_cache:
                if mode == "clip":
                    noise = frame_noise(0, range(latent), (channels, size, size))
                else:  # the pipeline's coordinated noise, laid out as the whole video
                    sizes = block_sizes(latent, LayerPipelineConfig().frames_per_block)
                    noise = torch.cat(
                        [block_noise(0, b, max(sizes), (channels, size, size))[:, :, :n] for b, n in enumerate(sizes)], 2
                    )  # fmt: skip
                began = time.perf_counter()
                out = pipe(
                    prompt=md.prompt_for(digit, direction), height=md.SIZE, width=md.SIZE, num_frames=FIDELITY_FRAMES,
                    num_inference_steps=args.steps, guidance_scale=md.GUIDANCE_SCALE, latents=noise, output_type="latent",
                ).frames  # fmt: skip
                dense_s = time.perf_counter() - began
                frames = decode_clip(pipe, out, None)
                dense_cache[(p, noise_kind)] = (out, torch.from_numpy(frames).float().mean(-1), dense_s)
            ref, ref_grey, dense_s = dense_cache[(p, noise_kind)]
            if mode == "pipeline" and kwargs.get("frames_per_block", 10) != 10:
                raise ValueError("the pipeline's dense reference assumes the default block split")
            rel = [metrics.relative_l2(lat[:, :, f], ref[:, :, f]) for f in range(latent)]
            per_run[label].append((rel, metrics.psnr(grey, ref_grey, data_range=1.0), secs, dense_s))
    rows = []
    for label, _, _ in FIDELITY_RUNS:
        runs = per_run[label]
        rel = torch.tensor([r for run in runs for r in run[0]])
        rows.append([label, f"{rel.mean():.3f}", f"{rel.max():.3f}",
                     " ".join(f"{v:.2f}" for v in torch.tensor([run[0] for run in runs]).mean(0).tolist()),
                     f"{sum(r[1] for r in runs) / len(runs):.1f}", f"{sum(r[2] for r in runs):.1f}"])  # fmt: skip
    headers = ["run (2 ranks)", "rel L2 per latent frame: mean", "max", "per frame 0..20 (mean over prompts)",
               "PSNR dB vs full attention", "denoise s (all prompts)"]  # fmt: skip
    dense_s = sum(v[2] for v in dense_cache.values()) / 2
    notes = (
        f"`moving-digits` zoo WanPipeline (trained on {md.NUM_FRAMES}-frame videos), {FIDELITY_FRAMES} frames = "
        f"{latent} latent frames at {md.SIZE}x{md.SIZE}, {args.steps} UniPC steps, guidance {md.GUIDANCE_SCALE}, "
        f"seed 0, prompts {ZOO_PROMPTS[: args.prompts]}, {args.ranks} gloo ranks. Reference = the plain "
        "WanPipeline with full attention on the same initial noise (per-frame noise for clip mode, the "
        "pipeline's coordinated block noise for pipeline mode), 1 process. Clip mode: padding 1, global "
        "frames 4 (clips of 11 and 10 latent frames). Pipeline mode: frames_per_block 10 -> blocks 7+7+7, "
        f"num_cat 5. Decoding exact (whole video) in both. Dense reference denoise: {dense_s:.1f} s for all "
        "prompts, 1 process. Times on a CPU shared with other jobs: indicative only."
    )
    return markdown_table(headers, rows), notes


def worker(args: argparse.Namespace) -> None:
    """One rank: its clip through the clip-parallel transformer (or a pipeline stage, or a zoo-model
    long video); rank 0 writes the JSON report and the gathered output."""
    torch.set_num_threads(1)
    ctx = init_distributed()
    if args.mode in ("zoo", "fidelity"):
        with ctx.guard():
            (zoo_worker if args.mode == "zoo" else fidelity_worker)(args, ctx)
        destroy_distributed(ctx)
        return
    if args.mode == "pipeline":
        with ctx.guard(), torch.no_grad():
            pipeline_worker(args, ctx)
        destroy_distributed(ctx)
        return
    with ctx.guard():
        transformer = build_transformer(ctx.device)
        config = ClipParallelConfig(
            padding=args.padding, global_frames=args.global_frames, phase_bias=0.0, local_scope="window",
            end_keys="none", global_sampling="uniform",
        )  # the timing table keeps the configuration it was first measured with
        handle = apply_clip_parallel(transformer, config, ctx=ctx, num_latent_frames=args.frames)
        start, end = handle.state.clip
        latents, t, text = inputs(range(start, end), args.height, args.width, ctx.device)
        with torch.no_grad():
            m = measure(lambda: transformer(latents, t, text, return_dict=False), args.repeats, 1, ctx.device)
            out = transformer(latents, t, text, return_dict=False)[0]
        summary = handle.stats.summary()
        recv = summary["recv_bytes"] / summary["calls"]  # per self-attention call: per forward and layer
        handle.remove()
        row = torch.tensor(
            [m.median_s, m.peak_bytes, recv, end - start], dtype=torch.float64, device=ctx.device
        )
        rows = gather_to_main(ctx, row.unsqueeze(0))
        outs = gather_to_main(ctx, out.movedim(2, 0).contiguous())
        if ctx.is_main:
            torch.save(torch.cat(outs).movedim(0, 2).cpu(), args.worker + ".pt")
            Path(args.worker).write_text(json.dumps([r[0].tolist() for r in rows]))
    destroy_distributed(ctx)


def launch(
    args: argparse.Namespace, ranks: int, frames: int, out: str, mode: str = "clip"
) -> tuple[list[list[float]], torch.Tensor]:
    """Run :func:`worker` on ``ranks`` processes; per-rank rows and the gathered output."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "mmaccel.benchmarks.bench_parallel_video",
           "--worker", out, "--frames", str(frames), "--height", str(args.height), "--width", str(args.width),
           "--padding", str(args.padding), "--global-frames", str(args.global_frames),
           "--repeats", str(args.repeats), "--mode", mode, "--steps", str(args.steps),
           "--frames-per-block", str(args.frames_per_block), "--prompts", str(args.prompts),
           "--context", getattr(args, "context", "prev_kv")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads(Path(out).read_text()), torch.load(out + ".pt", weights_only=True)


def vae_psnr(world_size: int) -> float:
    """PSNR of clip-wise decoding (``decode_overlap=1``) vs decoding the whole latent video."""
    from mmaccel.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()  # random weights: a pessimistic case, nothing trained damps far context
    latents = frame_noise(5, range(9), (16, 8, 12)) * 0.5
    whole = decode_clip(pipe, latents, None)
    plan = ClipPlan.build(9, world_size, 1, 0)
    parts = [
        decode_clip(pipe, latents[:, :, s:e], latents[:, :, s - 1 : s] if s else None) for s, e in plan.clips
    ]
    clipwise = torch.cat([torch.from_numpy(p) for p in parts])
    return metrics.psnr(clipwise, torch.from_numpy(whole), data_range=1.0)


def window_accuracy(videos: torch.Tensor) -> tuple[float, float]:
    """Digit and direction accuracy of the 17-frame windows (starting every 16 frames) of grey
    ``videos`` ``[P, F, H, W]`` generated for the first ``P`` of `ZOO_PROMPTS`."""
    from mmaccel.apps.zoo import moving_digits as md

    n = md.NUM_FRAMES
    windows = [
        (p, videos[p, s : s + n])
        for p in range(videos.shape[0])
        for s in range(0, videos.shape[1] - n + 1, n - 1)
    ]
    pred_d, pred_r = md.classify_videos(torch.stack([w for _, w in windows]))
    want_d = torch.tensor([ZOO_PROMPTS[p][0] for p, _ in windows])
    want_r = torch.tensor([md.DIRECTIONS.index(ZOO_PROMPTS[p][1]) for p, _ in windows])
    return (pred_d == want_d).float().mean().item(), (pred_r == want_r).float().mean().item()


def zoo_fidelity(args: argparse.Namespace, tmp: str) -> tuple[str, str]:
    """Long videos of the `moving-digits` zoo model: 1 process vs ``args.ranks`` ranks."""
    from diffusers import WanTransformer3DModel

    from mmaccel.apps.zoo import moving_digits as md
    from mmaccel.apps.zoo import zoo_path

    patch = WanTransformer3DModel.load_config(zoo_path(md.NAME) / "transformer")["patch_size"]
    tokens = (md.SIZE // 4 // patch[1]) * (md.SIZE // 4 // patch[2])  # the VAE is 4x spatial
    frames = args.zoo_frames
    rows = []
    one_s, one = launch(args, 1, frames, f"{tmp}/z1.json", "zoo")
    many_s, many = launch(args, args.ranks, frames, f"{tmp}/z{args.ranks}.json", "zoo")
    for label, secs, videos in (("1 process", one_s, one), (f"{args.ranks} ranks (clip)", many_s, many)):
        acc_d, acc_r = window_accuracy(videos)
        psnr = metrics.psnr(videos, one, data_range=1.0)
        rows.append([label, frames, f"{sum(secs):.1f}", f"{sum(secs) / sum(one_s):.2f}x",
                     f"{psnr:.1f}", f"{acc_d:.3f}", f"{acc_r:.3f}"])  # fmt: skip
    headers = ["run", "frames", "s (all prompts)", "time vs 1 proc", "PSNR dB vs 1 proc",
               "digit acc (17-frame windows)", "direction acc"]  # fmt: skip
    latent = (frames - 1) // 4 + 1
    notes = (
        f"`moving-digits` zoo WanPipeline (trained on {md.NUM_FRAMES}-frame videos, 5 latent frames), "
        f"`generate_long_video` clip mode, {frames} frames = {latent} latent frames x {tokens} tokens, {args.steps} UniPC "
        f"steps, guidance {md.GUIDANCE_SCALE}, seed 0, padding {args.padding}, global frames {args.global_frames}, "
        f"decode overlap 1, prompts {ZOO_PROMPTS[: args.prompts]}. PSNR over all grey frames vs the 1-process "
        "run of the same algorithm. Accuracy over the 17-frame windows of each video starting every 16 frames "
        "(digit classifier on the sprite, direction of the measured motion). Time = denoise + decode on "
        "rank 0, one thread per process, machine shared with other jobs."
    )
    return markdown_table(headers, rows), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 1 min)")
    parser.add_argument("--write", action="store_true", help=f"append the table to {RESULTS}")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--padding", type=int, default=1)
    parser.add_argument("--global-frames", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="pipeline mode: denoising steps")
    parser.add_argument(
        "--frames-per-block", type=int, default=2, help="pipeline mode: latent frames per block"
    )
    parser.add_argument("--skip-zoo", action="store_true", help="skip the fidelity run on the zoo model")
    parser.add_argument("--zoo-only", action="store_true", help="only the fidelity run on the zoo model")
    parser.add_argument("--fidelity-only", action="store_true",
                        help="only the fidelity table (both modes, reference defaults and options, vs full attention)")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="clip", help=argparse.SUPPRESS)
    parser.add_argument("--context", default="prev_kv", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    size = SIZES["quick" if args.quick else "full"]
    args.height, args.width = size["height"], size["width"]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 4)
    frames = size["frames"]
    args.prompts = args.prompts or (2 if args.quick else len(ZOO_PROMPTS))
    # zoo fidelity: 33 frames (9 latent frames, ~2x the training length), its own step count
    zoo_args = argparse.Namespace(**{**vars(args), "zoo_frames": 33, "steps": 8 if args.quick else 20})

    fid_args = argparse.Namespace(**{**vars(args), "steps": 8 if args.quick else 20})
    if args.fidelity_only:
        with tempfile.TemporaryDirectory() as tmp:
            ftable, fnotes = fidelity(fid_args, tmp)
        print(f"Machine: {machine_description()}\n\n### {FIDELITY_TITLE}\n\n{ftable}\n\n{fnotes}")
        if args.write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            append_results(FIDELITY_TITLE, ftable, fnotes, path=RESULTS)
        return
    if args.zoo_only:
        with tempfile.TemporaryDirectory() as tmp:
            ztable, znotes = zoo_fidelity(zoo_args, tmp)
        print(f"Machine: {machine_description()}\n\n### Fidelity on the trained zoo model `moving-digits`\n")
        print(f"{ztable}\n\n{znotes}")
        if args.write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            append_results(ZOO_TITLE, ztable, znotes, path=RESULTS)
        return
    with tempfile.TemporaryDirectory() as tmp:
        [(base_s, base_mem, _, _)], dense = launch(args, 1, frames, f"{tmp}/base.json")
        rows = [
            [f"{frames} frames, 1 process", frames, base_s, 1.0, base_mem / 2**20, 1.0, float("nan"), 0.0]
        ]
        for length in (frames,) if args.quick else (frames, 2 * frames):
            ranks, out = launch(args, args.ranks, length, f"{tmp}/r{length}.json")
            rel = metrics.relative_l2(out, dense) if length == frames else float("nan")
            per_frame = kv_bytes_per_frame(args.height, args.width)
            for rank, (secs, mem, recv, owned) in enumerate(ranks):
                all_gather = (length - owned) * per_frame  # every other frame's K/V, per layer and forward
                rows.append([f"{length} frames, rank {rank}/{args.ranks}", int(owned), secs, secs / base_s,
                             mem / 2**20, mem / base_mem, recv / all_gather, rel])  # fmt: skip
        # DualParal: the same block-wise algorithm on 1 process vs one layer stage per rank
        [(one_s, one_mem, one_w, _)], one_out = launch(args, 1, frames, f"{tmp}/p1.json", "pipeline")
        prow = [
            [f"{frames} frames, 1 process", MODEL["num_layers"], one_s, 1.0, one_mem / 2**20, 1.0, 1.0, 0.0]
        ]
        ranks, out = launch(args, args.ranks, frames, f"{tmp}/p2.json", "pipeline")
        rel = metrics.relative_l2(out, one_out)
        for rank, (secs, mem, weights, layers) in enumerate(ranks):
            prow.append([f"{frames} frames, rank {rank}/{args.ranks}", int(layers), secs, secs / one_s,
                         mem / 2**20, mem / one_mem, weights / one_w, rel])  # fmt: skip
        # the reference context (previous tail as input, next head K/V, newest first): rank 0 may
        # wait for the previous block's update, so its bubble is measured separately
        for context, label in (("reference", "reference context"), ("reference_lag", "reference context, tail_lag 1")):
            ref_args = argparse.Namespace(**{**vars(args), "context": context})
            [(ref_s, ref_mem, ref_w, _)], ref_out = launch(ref_args, 1, frames, f"{tmp}/{context}1.json", "pipeline")
            prow.append([f"{frames} frames, 1 process, {label}", MODEL["num_layers"], ref_s, ref_s / one_s,
                         ref_mem / 2**20, ref_mem / one_mem, ref_w / one_w, 0.0])  # fmt: skip
            ranks, out = launch(ref_args, args.ranks, frames, f"{tmp}/{context}2.json", "pipeline")
            rel = metrics.relative_l2(out, ref_out)
            for rank, (secs, mem, weights, layers) in enumerate(ranks):
                prow.append([f"{frames} frames, rank {rank}/{args.ranks}, {label}", int(layers), secs,
                             secs / ref_s, mem / 2**20, mem / ref_mem, weights / ref_w, rel])  # fmt: skip
        ztable, znotes = ("", "") if args.skip_zoo else zoo_fidelity(zoo_args, tmp)
        ftable, fnotes = ("", "") if args.skip_zoo else fidelity(fid_args, tmp)
    headers = ["run", "latent frames on rank", "s / forward", "time vs 1 proc", "peak MiB",
               "memory vs 1 proc", "K/V bytes vs all-gather", "rel L2 vs dense"]  # fmt: skip
    table = markdown_table(headers, rows)
    pheaders = ["run", "blocks on rank", f"s / {args.steps} steps", "time vs 1 proc", "peak MiB",
                "activations vs 1 proc", "weights vs 1 proc", "rel L2 vs 1 proc"]  # fmt: skip
    ptable = markdown_table(pheaders, prow)
    psnr = vae_psnr(args.ranks)
    tokens = (args.height // 2) * (args.width // 2)
    notes = (
        f"Transformer {MODEL['num_layers']} blocks, {MODEL['num_attention_heads']}x{MODEL['attention_head_dim']} "
        f"heads, {tokens} tokens per latent frame, padding {args.padding}, global frames {args.global_frames} "
        "(options local_scope='window', end_keys='none', global_sampling='uniform', phase_bias 0: the "
        "configuration these timings were first taken with), "
        f"{args.ranks} ranks, one thread per process, median of {args.repeats}. Peak = activation memory "
        f"(peak bytes of tensors created during a call, so weights excluded; harness.measure). K/V bytes: received per rank per forward (x2 per CFG step for both) "
        f"vs receiving every other frame's K/V. Clip-wise VAE decode vs whole decode (tiny Wan VAE, 9 latent "
        f"frames, {args.ranks} clips, overlap 1): PSNR {psnr:.1f} dB. Machine shared with other jobs."
    )
    blocks = frames // args.frames_per_block
    pnotes = (
        f"DualParal layer pipeline: {blocks} blocks of {args.frames_per_block} latent frames, num_cat 1, "
        "context 'prev_kv' with oldest block first (first rows) or the reference context with newest block "
        "first, with tail_lag 0 or 1 (rows marked; their ratios are vs the 1-process run of the same setting), "
        f"{args.steps} steps with CFG batched, stages of {MODEL['num_layers'] // args.ranks} transformer blocks. "
        f"Time = whole denoising of the video (1 run after 1 warm-up). Activations = peak bytes of tensors created during the run; weights "
        f"= parameter bytes held by the rank (a stage keeps only its blocks). rel L2 = 2-rank output vs the "
        f"same schedule on 1 process. With {blocks} blocks and {args.steps} steps the pipeline holds at most "
        f"{min(blocks, args.steps)} blocks in flight for {args.ranks} stages."
    )
    print(f"Machine: {machine_description()}\n\n{table}\n\n{notes}\n\n{ptable}\n\n{pnotes}")
    if ztable:
        print(f"\n### Fidelity on the trained zoo model `moving-digits`\n\n{ztable}\n\n{znotes}")
    if ftable:
        print(f"\n### {FIDELITY_TITLE}\n\n{ftable}\n\n{fnotes}")
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        append_results("Clip parallelism (Video-Infinity dual-scope attention)", table, notes, path=RESULTS)
        append_results("Block-wise layer pipeline (DualParal)", ptable, pnotes, path=RESULTS)
        if ztable:
            append_results(ZOO_TITLE, ztable, znotes, path=RESULTS)
        if ftable:
            append_results(FIDELITY_TITLE, ftable, fnotes, path=RESULTS)


if __name__ == "__main__":
    main()
