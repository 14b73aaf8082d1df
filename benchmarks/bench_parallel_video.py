"""Benchmark clip parallelism (Video-Infinity) and the layer pipeline (DualParal) against one
process and against diffusers' Ulysses context parallelism.

A Wan-shaped ``WanTransformer3DModel`` (random weights) on 2 ranks launched with ``torchrun``
(gloo on CPU, NCCL on GPU), one compute thread per process, so a rank stands for one device.
Each table is one spawned job in which every variant runs interleaved (`harness.compare`: a
warm-up each, >= 5 rotated rounds, the same order on every rank), per rank:

* one denoising forward of the whole video: on the rank alone (the 1-process baseline), clip
  parallelism (reference defaults and the window options), and diffusers' Ulysses
  (``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``; on CPU with the two-line
  accelerator shim, labelled "CPU shim"): time, peak activation memory, bytes received (clip:
  the handle's counters; Ulysses: wrapped collectives, checked against the analytic all-to-all
  payload), relative L2 vs the 1-process output;
* a few denoising steps of the whole video: DualParal's block-wise schedule on one rank and over
  the stages, the standard loop on one rank and with Ulysses: the same, plus weights per rank.

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

from mmaccel.benchmarks.harness import MIN_REPEATS, RESULTS_DIR, PeakTensorBytes, append_results, compare
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


def _cpu_accelerator_shim() -> None:
    """CPU shim (benchmark only, as in tests/test_context_parallel.py): diffusers' context
    parallelism builds its device mesh on an accelerator; on CPU with gloo it runs once these
    two report ``cpu`` and one device. On GPUs nothing is shimmed."""
    if not torch.cuda.is_available():
        torch._C._get_accelerator = lambda: torch.device("cpu")
        torch.accelerator.device_count = lambda: 1


class CommCounter:
    """Bytes this rank moves, counted by wrapping the collectives the variants call:
    ``funcol.all_to_all_single`` (Ulysses: payload in; ``(W-1)/W`` of it goes to other ranks),
    ``funcol.all_gather_tensor`` (diffusers' output gather: ``(W-1) x`` the input arrives) and
    ``dist.isend`` / ``dist.irecv`` (the DualParal pipe channels; only with ``p2p``: wrapped, they
    fail ``dist.P2POp``'s type check, which clip parallelism's exchanges use). Bytes per key."""

    def __init__(self, world_size: int, p2p: bool = False) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        self.bytes = {"all_to_all_recv": 0.0, "all_gather_recv": 0.0, "p2p_recv": 0.0, "p2p_sent": 0.0}
        w = world_size

        def count(key, scale, fn):
            def wrapped(tensor, *args, **kwargs):
                self.bytes[key] += tensor.numel() * tensor.element_size() * scale
                return fn(tensor, *args, **kwargs)

            return wrapped

        funcol.all_to_all_single = count("all_to_all_recv", (w - 1) / w, funcol.all_to_all_single)
        funcol.all_gather_tensor = count("all_gather_recv", w - 1, funcol.all_gather_tensor)
        if p2p:
            dist.isend = count("p2p_sent", 1, dist.isend)
            dist.irecv = count("p2p_recv", 1, dist.irecv)

    def snapshot(self) -> dict[str, float]:
        return dict(self.bytes)


def peak_bytes(fn) -> int:
    """Peak activation bytes of one call of ``fn`` (untimed; every rank must call it alike)."""
    with PeakTensorBytes() as tracker:
        fn()
    return tracker.peak


def ulysses_bytes_per_forward(frames: int, height: int, width: int, batch: int = 1, world: int = 2) -> float:
    """Analytic Ulysses bytes a rank receives per forward (float32): in every block's
    self-attention, Q, K, V (head-scattered) and the output (sequence-scattered) each pass one
    all-to-all of the rank's ``S / W`` tokens x all heads, ``(W-1)/W`` of it from the other ranks."""
    tokens = frames * (height // 2) * (width // 2)
    per_tensor = batch * tokens / world * MODEL["num_attention_heads"] * MODEL["attention_head_dim"] * 4
    return MODEL["num_layers"] * 4 * per_tensor * (world - 1) / world


def _rank_rows(ctx, names: list[str], result: dict, peaks: dict, extra: dict[str, list[float]]) -> list | None:
    """Per variant: median, min, max s, ratio (min, max), peak bytes, then ``extra``; gathered."""
    rows = []
    for name in names:
        c = result[name]
        rows.append([c.median_s, min(c.times_s), max(c.times_s), c.ratio, c.ratio_min, c.ratio_max,
                     float(c.overlaps), peaks[name], *extra[name]])  # fmt: skip
    gathered = gather_to_main(ctx, torch.tensor(rows, dtype=torch.float64, device=ctx.device).unsqueeze(0))
    return None if gathered is None else [g[0].tolist() for g in gathered]


def peers_worker(args: argparse.Namespace, ctx) -> None:
    """One rank: a denoising forward of the whole video, interleaved (harness.compare): on this
    rank alone with no communication (the 1-process baseline), clip parallelism (reference
    defaults, and the window options), and diffusers' Ulysses (CPU shim); rank 0 saves outputs."""
    from diffusers import ContextParallelConfig

    frames = args.frames
    counter = CommCounter(ctx.world_size)
    base = build_transformer(ctx.device)
    clips = {
        "clip parallel (reference defaults)": ClipParallelConfig(padding=args.padding, global_frames=args.global_frames),
        "clip parallel (window options)": ClipParallelConfig(
            padding=args.padding, global_frames=args.global_frames, phase_bias=0.0, local_scope="window",
            end_keys="none", global_sampling="uniform"),
    }  # fmt: skip
    handles, models = {}, {}
    for name, config in clips.items():
        models[name] = build_transformer(ctx.device)
        handles[name] = apply_clip_parallel(models[name], config, ctx=ctx, num_latent_frames=frames)
    start, end = handles[next(iter(clips))].state.clip
    uly = build_transformer(ctx.device)
    uly.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ctx.world_size))
    whole = inputs(range(frames), args.height, args.width, ctx.device)
    clip_in = inputs(range(start, end), args.height, args.width, ctx.device)
    calls = dict.fromkeys(["1 process", *clips, "Ulysses"], 0)

    def forward(name, model, x):
        def run():
            calls[name] += 1
            return model(*x, return_dict=False)[0]

        return run

    fns = {"1 process": forward("1 process", base, whole)}
    fns.update({name: forward(name, models[name], clip_in) for name in clips})
    uly_before = counter.snapshot()
    fns["Ulysses"] = forward("Ulysses", uly, whole)
    with torch.no_grad():
        outs = {name: fn() for name, fn in fns.items()}
        uly_once = {k: v - uly_before[k] for k, v in counter.snapshot().items()}  # one Ulysses forward
        result = compare(fns, repeats=args.repeats, warmup=1)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
    extra = {"1 process": [0.0, 0.0]}
    for name in clips:
        summary = handles[name].stats.summary()
        extra[name] = [summary["recv_bytes"] / calls[name], summary["sent_bytes"] / calls[name]]
    extra["Ulysses"] = [uly_once["all_to_all_recv"] + uly_once["all_gather_recv"], uly_once["all_to_all_recv"]]
    rows = _rank_rows(ctx, list(fns), result, peaks, extra)
    clip_outs = {name: gather_to_main(ctx, outs[name].movedim(2, 0).contiguous()) for name in clips}
    if ctx.is_main:
        full = {name: torch.cat(parts).movedim(0, 2).cpu() for name, parts in clip_outs.items()}
        torch.save({"1 process": outs["1 process"].cpu(), **full, "Ulysses": outs["Ulysses"].cpu()}, args.worker + ".pt")
        Path(args.worker).write_text(json.dumps({"names": list(fns), "rows": rows}))


def _stage_only(transformer, lo: int, hi: int):
    for i in range(MODEL["num_layers"]):  # a stage holds only its own blocks
        if not lo <= i < hi:
            transformer.blocks[i] = torch.nn.Identity()
    return transformer


def pipeline_peers_worker(args: argparse.Namespace, ctx) -> None:
    """One rank: ``args.steps`` denoising steps (CFG batched) of the whole video, interleaved: the
    DualParal block-wise schedule on this rank alone (its 1-process baseline), the standard
    denoising loop on this rank alone, DualParal over the ranks, and the standard loop with
    diffusers' Ulysses (CPU shim), all from the same initial noise."""
    from diffusers import ContextParallelConfig, UniPCMultistepScheduler

    from mmaccel.runtime.distributed import DistContext

    counter = CommCounter(ctx.world_size, p2p=True)

    def scheduler():
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    text = torch.randn(2, TEXT_TOKENS, MODEL["text_dim"], generator=torch.Generator().manual_seed(1)).to(ctx.device)
    context, lag = ("reference", 1) if args.context == "reference_lag" else (args.context, 0)
    order = "newest_first" if context == "reference" else "oldest_first"
    config = LayerPipelineConfig(frames_per_block=args.frames_per_block, num_cat=1, context=context, order=order,
                                 tail_lag=lag)  # fmt: skip
    lo, hi = split_stages(MODEL["num_layers"], ctx.world_size)[ctx.rank]
    staged = SimpleNamespace(transformer=_stage_only(build_transformer(ctx.device), lo, hi), scheduler=scheduler())
    whole = SimpleNamespace(transformer=build_transformer(ctx.device), scheduler=scheduler())
    single = DistContext.single(ctx.device)
    shape = (MODEL["in_channels"], args.height, args.width)
    sizes = block_sizes(args.frames, args.frames_per_block)
    noise = torch.cat([block_noise(0, b, max(sizes), shape)[:, :, :n] for b, n in enumerate(sizes)], 2)
    plain, uly = build_transformer(ctx.device), build_transformer(ctx.device)
    uly.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ctx.world_size))
    kw = dict(text=text, guidance_scale=5.0, num_latent_frames=args.frames, latent_hw=(args.height, args.width),
              steps=args.steps, seed=0, progress=False)  # fmt: skip

    def standard_loop(model) -> torch.Tensor:
        sched = scheduler()
        sched.set_timesteps(args.steps)
        x = noise.clone().to(ctx.device)
        for t in sched.timesteps:
            cond, uncond = model(x.expand(2, -1, -1, -1, -1), t.expand(2), text, return_dict=False)[0].chunk(2)
            x = sched.step(uncond + 5.0 * (cond - uncond), t, x).prev_sample
        return x

    fns = {
        "1 process: DualParal schedule": lambda: run_layer_pipeline(whole, single, config, **kw)[0],
        "1 process: standard loop": lambda: standard_loop(plain),
        "DualParal": lambda: run_layer_pipeline(staged, ctx, config, **kw)[0],
        "Ulysses (standard loop)": lambda: standard_loop(uly),
    }
    with torch.no_grad():
        outs, moved = {}, {}
        for name, fn in fns.items():
            before = counter.snapshot()
            outs[name] = fn()
            moved[name] = {k: v - before[k] for k, v in counter.snapshot().items()}
        result = compare(fns, repeats=args.repeats, warmup=1)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
    weights = {
        name: sum(p.numel() * p.element_size() for p in m.parameters())
        for name, m in zip(fns, (whole.transformer, plain, staged.transformer, uly))
    }
    extra = {name: [sum(v for k, v in moved[name].items() if k.endswith("recv")), weights[name]] for name in fns}
    rows = _rank_rows(ctx, list(fns), result, peaks, extra)
    if ctx.is_main:
        torch.save({name: out.cpu() for name, out in outs.items()}, args.worker + ".pt")
        Path(args.worker).write_text(json.dumps({"names": list(fns), "rows": rows}))


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
    _cpu_accelerator_shim()  # CPU shim for diffusers' Ulysses rows (no-op on GPUs)
    with ctx.guard(), torch.no_grad():
        (pipeline_peers_worker if args.mode == "pipeline" else peers_worker)(args, ctx)
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
    parser.add_argument("--context", default="prev_kv", choices=["prev_kv", "reference", "reference_lag"],
                        help="DualParal context of the pipeline table: prev_kv (oldest first), reference (newest "
                        "first), reference_lag (reference with tail_lag 1)")  # fmt: skip
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
    args.repeats = max(args.repeats or MIN_REPEATS, MIN_REPEATS)
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
        table, notes = peers_table(args, frames, tmp)
        ptable, pnotes = pipeline_table(args, frames, tmp)
        ztable, znotes = ("", "") if args.skip_zoo else zoo_fidelity(zoo_args, tmp)
        ftable, fnotes = ("", "") if args.skip_zoo else fidelity(fid_args, tmp)
    load = os.getloadavg()
    print(f"Machine: {machine_description()}\nload average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          f" (machine shared with other engineers' jobs)\n\n{table}\n\n{notes}\n\n{ptable}\n\n{pnotes}")  # fmt: skip
    if ztable:
        print(f"\n### Fidelity on the trained zoo model `moving-digits`\n\n{ztable}\n\n{znotes}")
    if ftable:
        print(f"\n### {FIDELITY_TITLE}\n\n{ftable}\n\n{fnotes}")
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        shared = f" Load average (1 min) at the end: {load[0]:.2f} on this shared machine."
        append_results(PEERS_TITLE, table, notes + shared, path=RESULTS)
        append_results(PIPELINE_TITLE, ptable, pnotes + shared, path=RESULTS)
        if ztable:
            append_results(ZOO_TITLE, ztable, znotes, path=RESULTS)
        if ftable:
            append_results(FIDELITY_TITLE, ftable, fnotes, path=RESULTS)


PEERS_TITLE = "Clip parallelism vs diffusers Ulysses (one forward, 2 ranks)"
PIPELINE_TITLE = "DualParal vs diffusers Ulysses (denoising steps, 2 ranks)"


def _fmt_rows(names: list[str], ranks: list, outs: dict, ref_name: str, extra_cols) -> list[list]:
    """Table rows per variant and rank from `_rank_rows`' numbers; rel L2 vs ``outs[ref_name]``."""
    rows = []
    for name in names:
        for rank, per_variant in enumerate(ranks):
            med, lo, hi, ratio, rlo, rhi, overlaps, peak, *extra = per_variant[names.index(name)]
            rows.append([name, f"{rank}/{len(ranks)}", f"{med:.3g} ({lo:.3g}-{hi:.3g})",
                         f"{ratio:.2f}x ({rlo:.2f}-{rhi:.2f})" + (" ~noise" if overlaps else ""),
                         "n/a" if peak != peak else f"{peak / 2**20:.1f}", *extra_cols(name, extra),
                         f"{metrics.relative_l2(outs[name], outs[ref_name]):.2e}"])  # fmt: skip
    return rows


def _verdict(names: list[str], ranks: list, technique: str, peer: str) -> str:
    """``technique`` vs ``peer`` on rank 0: ratio of their median times (same job, interleaved)."""
    t, p = ranks[0][names.index(technique)][0], ranks[0][names.index(peer)][0]
    word = "ahead" if t < p else "behind"
    return f"{technique} vs {peer}: {word} by {max(p / t, t / p):.2f}x in time (rank 0 medians {t:.3g} s vs {p:.3g} s)"


def peers_table(args: argparse.Namespace, frames: int, tmp: str) -> tuple[str, str]:
    """Clip parallelism (2 configurations) and Ulysses vs the 1-process forward, one spawned job."""
    report, outs = launch(args, args.ranks, frames, f"{tmp}/peers.json", "clip")
    names, ranks = report["names"], report["rows"]
    analytic = ulysses_bytes_per_forward(frames, args.height, args.width, world=args.ranks)

    def cols(name, extra):
        recv, other = extra
        if name == "Ulysses":
            return [f"{recv / 2**20:.2f}", f"all-to-all {other / 2**20:.2f} (analytic {analytic / 2**20:.2f}) + output gather"]
        if name == "1 process":
            return ["0", "-"]
        return [f"{recv / 2**20:.2f}", f"sent {other / 2**20:.2f}"]

    rows = _fmt_rows(names, ranks, outs, "1 process", cols)
    headers = ["variant", "rank", f"s / forward, median (min-max) of {args.repeats}", "speed vs 1 process, median (min-max)",
               "peak activation MiB", "MiB received / forward", "detail (MiB)", "rel L2 vs 1 process"]  # fmt: skip
    verdicts = [_verdict(names, ranks, n, "Ulysses") for n in names if n.startswith("clip")]
    tokens = (args.height // 2) * (args.width // 2)
    notes = (
        f"Transformer {MODEL['num_layers']} blocks, {MODEL['num_attention_heads']}x{MODEL['attention_head_dim']} heads "
        f"(random weights), {frames} latent frames x {tokens} tokens, {args.ranks} gloo ranks, one thread per process. "
        "One spawned job runs all variants interleaved (harness.compare: 1 warm-up each, "
        f"{args.repeats} rotated rounds, the same order on every rank); '1 process' = the whole video's forward on "
        "the rank alone with no communication (both ranks run it at once, so the load matches). Clip parallelism: "
        f"padding {args.padding}, global frames {args.global_frames}; each rank owns {frames // args.ranks} frames. "
        "Ulysses = diffusers `enable_parallelism(ContextParallelConfig(ulysses_degree=2))` on the same "
        "model, with the CPU shim (torch._C._get_accelerator / torch.accelerator.device_count patched in the "
        "benchmark worker); its bytes are counted by wrapping funcol.all_to_all_single (x (W-1)/W) and "
        "funcol.all_gather_tensor (x (W-1)); the analytic all-to-all figure = layers x 4 (Q, K, V, out) x S/W "
        "tokens x heads x dim x 4 B x (W-1)/W. Clip bytes: the handle's recv/sent counters per forward. Peak = "
        "activation memory (PeakTensorBytes, weights excluded; every variant holds the full weights). rel L2 vs "
        "the rank's own 1-process output of the whole video. Clip-wise VAE decode vs whole decode (tiny Wan VAE, 9 "
        f"latent frames, {args.ranks} clips, overlap 1): PSNR {vae_psnr(args.ranks):.1f} dB. Verdicts: "
        + "; ".join(verdicts) + "."
    )
    return markdown_table(headers, rows), notes


def pipeline_table(args: argparse.Namespace, frames: int, tmp: str) -> tuple[str, str]:
    """DualParal and Ulysses over denoising steps vs their 1-process runs, one spawned job."""
    report, outs = launch(args, args.ranks, frames, f"{tmp}/pipe.json", "pipeline")
    names, ranks = report["names"], report["rows"]

    def cols(name, extra):
        recv, weights = extra
        return [f"{recv / 2**20:.2f}", f"weights {weights / 2**20:.2f}"]

    sizes = block_sizes(frames, args.frames_per_block)
    shape = (MODEL["in_channels"], args.height, args.width)
    noise = torch.cat([block_noise(0, b, max(sizes), shape)[:, :, :n] for b, n in enumerate(sizes)], 2)
    outs = {name: out - noise for name, out in outs.items()}  # the denoising update: few steps stay near the noise
    rows = []
    for ref, group in (("1 process: DualParal schedule", ("1 process: DualParal schedule", "DualParal")),
                       ("1 process: standard loop", ("1 process: standard loop", "Ulysses (standard loop)"))):  # fmt: skip
        for row in _fmt_rows(names, ranks, outs, ref, cols):
            if row[0] in group:
                row.append(f"{metrics.relative_l2(outs[row[0]], outs['1 process: standard loop']):.3f}")
                rows.append(row)
    base = names.index("1 process: standard loop")
    for row in rows:  # speeds vs the standard loop too (the first variant is compare's baseline)
        rank = int(row[1].split("/")[0])
        row.insert(4, f"{ranks[rank][base][0] / ranks[rank][names.index(row[0])][0]:.2f}x")
    headers = ["variant", "rank", f"s / {args.steps} steps, median (min-max) of {args.repeats}",
               "speed vs 1-process DualParal schedule, median (min-max)", "speed vs 1-process standard loop (medians)",
               "peak activation MiB", "MiB received / run", "detail (MiB)", "rel L2 vs own 1-process run",
               "rel L2 vs standard loop"]  # fmt: skip
    blocks = len(sizes)
    notes = (
        f"Same model and video as above; {args.steps} UniPC steps (flow shift 3), CFG 5 batched (2 x the video per "
        f"forward), the same initial noise (DualParal's coordinated block noise laid out as the whole video). "
        f"DualParal: {blocks} blocks of {args.frames_per_block} latent frames, num_cat 1, context {args.context!r} "
        f"({'newest' if args.context.startswith('reference') else 'oldest'} first), stages of {MODEL['num_layers'] // args.ranks} blocks (a stage holds only its blocks: see weights); "
        "its 1-process baseline is the same block-wise schedule on one rank. Ulysses runs the standard denoising "
        "loop (every step over the whole video), its baseline the same loop on one rank. One spawned job, all four "
        f"interleaved (harness.compare, 1 warm-up, {args.repeats} rotated rounds). Received bytes: wrapped "
        "dist.irecv (DualParal's pipe channels) and funcol collectives (Ulysses), one run. rel L2 of the update "
        "(final latents - initial noise); vs standard loop: the algorithmic difference of the block-wise "
        "schedule. Verdict: "
        + _verdict(names, ranks, "DualParal", "Ulysses (standard loop)") + "."
    )
    return markdown_table(headers, rows), notes


if __name__ == "__main__":
    main()
