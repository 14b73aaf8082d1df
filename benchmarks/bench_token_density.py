"""Benchmark: training-free token density (FlexDiT-style) vs the dense transformer.

Random-weight transformers shaped like DiT-XL/2 at 512 px (28 blocks, 1152 wide, 32x32 = 1,024
tokens) and Wan 2.1 1.3B (1536 wide, 12 heads, FFN 8960; 10 of its 30 blocks, a 4 x 16 x 16 =
1,024-token latent video, 512 text tokens). For each setting: one forward at a reduced step
(progress 0.1) -- time, FLOPs (``torch.utils.flop_counter``), peak memory, PSNR of the denoiser
output vs dense -- and, for the default schedule, a short sampling run: wall time and PSNR of
the final latents vs the dense run. Ratios are against the dense model in the same process.

Fidelity on a trained model: the zoo's Digits DiT (`mmaccel.apps.zoo.digits_dit`, 6 blocks, 8x8 = 64
tokens) sampled with its default settings (DPM-Solver++, 20 steps, guidance 2) from the same
noise with and without token density: PSNR / SSIM of the images against the dense samples,
digit-classifier accuracy on the requested classes, classifier-feature Frechet distance to the
test digits, and the sampling-time ratio.

    .venv/bin/python -m mmaccel.benchmarks.bench_token_density [--quick] [--write] [--only dit|wan|zoo]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from tqdm import tqdm

from mmaccel.benchmarks.harness import RESULTS_DIR, append_results, compare
from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density, count_flops
from mmaccel.runtime.budget import ConstantSchedule, StepSchedule
from mmaccel.runtime.metrics import psnr
from mmaccel.runtime.tables import markdown_table

RESULTS = RESULTS_DIR / "token_density.md"
QUARTER = ConstantSchedule(0.25)
SPEED_TARGET_DEFAULT = 1.8  # training-free, default schedule (issue 3)


def _build_dit(
    quick: bool,
) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tuple]:
    from diffusers import DiTTransformer2DModel

    dims = (
        dict(num_layers=6, num_attention_heads=6, attention_head_dim=64, sample_size=32)
        if quick
        else dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=64)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiTTransformer2DModel(
            in_channels=4, out_channels=8, patch_size=2, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, **dims,
        ).eval()  # fmt: skip
    labels = torch.tensor([207])

    def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(latents, timestep=t.reshape(1), class_labels=labels).sample[:, :4]

    s = dims["sample_size"]
    return model, denoise, (1, 4, s, s)


def _build_wan(
    quick: bool,
) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tuple]:
    from diffusers import WanTransformer3DModel

    dims = (
        dict(
            num_layers=4, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, text_dim=64, freq_dim=64
        )
        if quick
        else dict(
            num_layers=10,
            num_attention_heads=12,
            attention_head_dim=128,
            ffn_dim=8960,
            text_dim=4096,
            freq_dim=256,
        )
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **dims,
        ).eval()  # fmt: skip
        text = torch.randn(1, 32 if quick else 512, dims["text_dim"])

    def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(latents, timestep=t.reshape(1), encoder_hidden_states=text).sample

    shape = (1, 16, 2, 16, 16) if quick else (1, 16, 4, 32, 32)
    return model, denoise, shape


def _sample(kind: str, denoise: Callable, shape: tuple, steps: int) -> torch.Tensor:
    """A short sampling run (DDIM for DiT, flow-matching Euler with shift 3 for Wan)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    scheduler = (
        DDIMScheduler(num_train_timesteps=1000)
        if kind == "dit"
        else FlowMatchEulerDiscreteScheduler(shift=3.0)
    )
    scheduler.set_timesteps(steps)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for t in tqdm(scheduler.timesteps, desc=f"{kind} sampling", leave=False):
        latents = scheduler.step(denoise(latents, t), t, latents).prev_sample
    return latents


def _settings(kind: str, depth: int, quick: bool) -> list[tuple[str, TokenDensityConfig | None]]:
    video = kind == "wan"
    reduced = TokenDensityConfig().layout(depth)[1].stop  # blocks below the dense top of the auto layout
    f = (1, 2, 2) if video else (2, 2)
    rows: list[tuple[str, TokenDensityConfig | None]] = [
        ("dense", None),
        ("pool 2x2, sparse_q", TokenDensityConfig(factor=f, schedule=QUARTER)),
        ("pool 2x2, sparse_kv", TokenDensityConfig(factor=f, schedule=QUARTER, sparse_mode="sparse_kv")),
        ("merge 2x2 (ToMe), sparse_q", TokenDensityConfig(reducer="merge", factor=f, schedule=QUARTER)),
        (
            f"pool 2x2, blocks 0-{reduced - 1} all pooled",
            TokenDensityConfig(factor=f, schedule=QUARTER, pooled_blocks=(0, reduced), sparse_blocks=None),
        ),
    ]
    if quick:  # linear expansion costs the same FLOPs as nearest; kept out of the long full run
        rows.insert(
            3,
            (
                "pool 2x2, sparse_q, linear expand",
                TokenDensityConfig(factor=f, schedule=QUARTER, expand="linear"),
            ),
        )
    if video:
        rows.insert(
            2,
            (
                "pool 2x2x2 (frames), sparse_q",
                TokenDensityConfig(factor=(2, 2, 2), schedule=ConstantSchedule(0.125)),
            ),
        )
    return rows


def _applied(model: torch.nn.Module, cfg: TokenDensityConfig | None, fn: Callable[[], torch.Tensor], record: dict):
    """A callable that runs ``fn`` with ``cfg`` applied (installed and removed around the call, a
    few microseconds) and records the output and the token ratio in ``record``."""

    def run() -> torch.Tensor:
        if cfg is None:
            record["out"], record["tokens"], record["reduced"] = fn(), 1.0, 0
        else:
            with apply_token_density(model, cfg) as handle:
                record["out"] = fn()
                record["tokens"] = handle.stats.token_ratio
                record["reduced"] = sum(s.token_ratio < 1 for s in handle.stats.steps)
        return record["out"]

    return run


@torch.no_grad()
def bench(kind: str, quick: bool, steps: int, repeats: int) -> tuple[str, str]:
    """Forward-time table at a reduced step and sampling table for the default schedule. Every
    ratio from harness.compare (warm-up per setting, interleaved rotated rounds, min-max)."""
    model, denoise, shape = (_build_dit if kind == "dit" else _build_wan)(quick)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(900.0)  # progress 0.1: a reduced step under the default schedule
    depth = len(getattr(model, "blocks", None) or model.transformer_blocks)
    settings = _settings(kind, depth, quick)
    records: dict[str, dict] = {name: {} for name, _ in settings}
    fns = {name: _applied(model, cfg, lambda: denoise(latents, t), records[name]) for name, cfg in settings}
    result = compare(fns, repeats=repeats, memory=True)
    base_flops = base_peak = None
    rows = []
    for name, _ in settings:
        _, flops = count_flops(fns[name])
        cmp, rec = result[name], records[name]
        base_flops, base_peak = base_flops or flops, base_peak or max(cmp.peak_bytes, 1)
        rows.append([
            name, cmp.time_text(), "1.00x (ref)" if name == "dense" else cmp.ratio_text(), f"{flops / 1e9:.1f}",
            f"{flops / base_flops:.2f}", f"{cmp.peak_bytes / 2**20:.0f}", f"{cmp.peak_bytes / base_peak:.2f}",
            f"{rec['tokens']:.3f}", f"{psnr(rec['out'], records['dense']['out']):.1f}",
        ])  # fmt: skip
    headers = ["setting (keep 0.25, progress 0.1)", "forward s (median, min-max)", "speed-up (median, min-max)",
               "GFLOPs", "FLOPs ratio", "peak MiB", "peak ratio", "token ratio", "PSNR dB (output)"]  # fmt: skip
    forward_table = markdown_table(headers, rows)

    # Short sampling run with the default schedule (keep 0.25 until progress 0.8, then dense).
    f = (1, 2, 2) if kind == "wan" else (2, 2)
    sampling = [("dense", None), ("default (pool, sparse_q)", TokenDensityConfig(factor=f))]
    if quick:  # the merge run doubles the cost of the full benchmark on a shared 2-core machine
        sampling.append(("default, merge", TokenDensityConfig(reducer="merge", factor=f)))
    records = {name: {} for name, _ in sampling}
    fns = {name: _applied(model, cfg, lambda: _sample(kind, denoise, shape, steps), records[name])
           for name, cfg in sampling}  # fmt: skip
    result = compare(fns, repeats=repeats)
    sample_rows = []
    for name, cfg in sampling:
        cmp, rec = result[name], records[name]
        target = "" if cfg is None else ("met" if cmp.ratio >= SPEED_TARGET_DEFAULT else "missed")
        sample_rows.append([name, cmp.time_text(), "1.00x (ref)" if cfg is None else cmp.ratio_text(), target,
                            f"{rec['reduced']}/{steps}", f"{rec['tokens']:.3f}",
                            f"{psnr(rec['out'], records['dense']['out']):.1f}"])  # fmt: skip
    sample_table = markdown_table(
        [f"{steps}-step sampling", "wall s (median, min-max)", "speed-up (median, min-max)",
         f">= {SPEED_TARGET_DEFAULT}x (median)", "reduced steps", "token ratio", "PSNR dB (final latents)"],
        sample_rows,
    )  # fmt: skip
    return forward_table, sample_table


def _zoo_settings() -> list[tuple[str, TokenDensityConfig | None]]:
    return [
        ("dense", None),
        ("keep 1.0 (identity)", TokenDensityConfig(schedule=ConstantSchedule(1.0))),
        ("default: pool 2x2, sparse_q, keep 0.25 until progress 0.8", TokenDensityConfig()),
        ("default schedule, merge 2x2 (ToMe)", TokenDensityConfig(reducer="merge")),
        ("default schedule, sparse_kv", TokenDensityConfig(sparse_mode="sparse_kv")),
        (
            "pool 2x2, sparse_q, keep 0.25 until progress 0.3",
            TokenDensityConfig(schedule=StepSchedule(boundaries=(0.3,), ratios=(0.25, 1.0))),
        ),
        ("keep 0.25 at every step", TokenDensityConfig(schedule=QUARTER)),
        (
            "keep 0.25 at every step, blocks 0-4 all pooled",
            TokenDensityConfig(schedule=QUARTER, pooled_blocks=(0, 5), sparse_blocks=None),
        ),
    ]


@torch.no_grad()
def fidelity(quick: bool) -> tuple[str, int]:
    """Token density on the trained zoo Digits DiT vs its dense samples (same noise); returns the
    markdown table and the number of samples."""
    from mmaccel.apps.zoo import digits_dit
    from mmaccel.apps.zoo.digits import load_digit_classifier

    pipe = digits_dit.load()
    clf = load_digit_classifier()
    labels = torch.arange(10).repeat_interleave(2 if quick else 20)
    settings = _zoo_settings()
    records: dict[str, dict] = {name: {} for name, _ in settings}
    fns = {
        name: _applied(pipe.transformer, cfg, lambda: digits_dit.generate(pipe, labels.tolist()), records[name])
        for name, cfg in settings
    }
    result = compare(fns)  # warm-up per setting, 5 interleaved rounds
    ref = records["dense"]["out"]
    rows = []
    for name, cfg in settings:
        rec, cmp = records[name], result[name]
        m = digits_dit.sample_metrics(rec["out"], labels, reference=ref, classifier=clf)
        rows.append([
            name, f"{rec['tokens']:.3f}", cmp.time_text(), "1.00x (ref)" if cfg is None else cmp.ratio_text(),
            f"{m['PSNR dB vs reference']:.1f}", f"{m['SSIM vs reference']:.3f}",
            f"{m['sample accuracy']:.3f}", f"{m['sample FD vs test digits']:.2f}",
        ])  # fmt: skip
    headers = ["setting", "token ratio", "sampling s (median, min-max)", "speed-up (median, min-max)", "PSNR dB vs dense", "SSIM vs dense",
               "classifier accuracy", "FD vs test digits"]  # fmt: skip
    return markdown_table(headers, rows), len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute")
    parser.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    parser.add_argument("--only", choices=("dit", "wan", "zoo"), help="run one model / the zoo fidelity only")
    args = parser.parse_args()
    steps, repeats = (4, 5) if args.quick else (6, 5)
    for kind in ("dit", "wan"):
        if args.only and kind != args.only:
            continue
        title = {
            "dit": "DiT-XL/2-shaped, 512 px (1,024 tokens)",
            "wan": "Wan 2.1 1.3B-shaped, 10 blocks, 4x16x16 video tokens",
        }[kind]
        if args.quick:
            title = {
                "dit": "DiT --quick (6 blocks, 384 wide, 256 tokens)",
                "wan": "Wan --quick (4 blocks, 256 wide, 2x8x8 tokens)",
            }[kind]
        forward_table, sample_table = bench(kind, args.quick, steps, repeats)
        print(f"\n## Token density: {title}\n\n{forward_table}\n\n{sample_table}\n", flush=True)
        if args.write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            notes = (
                "Random weights, fp32, batch 1. Forward rows: one denoiser call at progress 0.1 (t = 900). "
                f"Times and ratios from harness.compare: a warm-up per setting, {repeats} interleaved rounds "
                "(order rotated), median with min-max, ~noise where the time ranges overlap; FLOPs from torch.utils.flop_counter (matmuls + attention); peak memory "
                "is the peak of live activation tensors (harness PeakTensorBytes), set by the dense top blocks. "
                "Sampling rows use the default schedule "
                "(StepSchedule: keep 0.25 until progress 0.8, dense after). Machine shared with other jobs."
            )
            append_results(
                f"Token density: {title}", f"{forward_table}\n\n{sample_table}", notes, path=RESULTS
            )
    if args.only in (None, "zoo"):
        table, n = fidelity(args.quick)
        title = f"Token density fidelity: zoo Digits DiT, {n} samples"
        print(f"\n## {title}\n\n{table}\n", flush=True)
        if args.write:
            from mmaccel.apps.zoo.digits_dit import SAMPLING

            notes = (
                f"Trained zoo model `digits-dit` (6 blocks, 64 tokens, auto layout: block 0 pooled, 1-4 sparse, "
                f"5 dense), DPM-Solver++ {SAMPLING['num_inference_steps']} steps, guidance "
                f"{SAMPLING['guidance_scale']}, batches of 100 samples (x2 for guidance), fp32. Every setting starts from the "
                "dense run's noise (seed i for sample i); PSNR / SSIM of the [0, 1] images vs the dense samples, "
                "accuracy of the zoo digit classifier on the requested classes (10 classes x "
                f"{n // 10}), FD of its features vs the 360 test digits. Wall time of the whole sampling run "
                "from harness.compare (a warm-up per setting, 5 interleaved rounds, median with min-max); "
                "machine shared with other jobs."
            )
            append_results(title, table, notes, path=RESULTS)


if __name__ == "__main__":
    main()
