"""FlexDiT layout vs the dense DiT it was converted from: speed, FLOPs, memory, fidelity.

DiT-XL/2-shaped transformer at 512 px (32x32 = 1,024 tokens, 28 blocks, width 1152) with random
weights, batch 1, fp32. Rows: the dense model; the paper's layout (2 Poolingformer blocks, 4
SDTMs of (2 cross, 2 sparse, 1 recovery, 1 dense), 2 dense) with an 8x8 sparse grid; and the
same layout with a linear temporal schedule at the noisiest step (4x4 grid). Speed and memory
are ratios to the dense forward measured in the same run; FLOPs are counted by
``torch.utils.flop_counter`` (CPU SDPA included). Fidelity of the *untrained* conversion
(output PSNR at t=500 and final-latent PSNR after a short DDIM run) is poor by construction:
the SDTMs skip the dense path until fine-tuned (``mmaccel.diffusion.train``). A second table shows that
a few distillation steps on a tiny DiT raise that fidelity. A third table does the same on the
trained zoo Digits DiT (``mmaccel.apps.zoo.digits_dit``, 6 blocks, 8x8 tokens), distilled on the VAE
latents of the training digits, and scores the samples: PSNR / SSIM against the dense model's
samples from the same noise, digit-classifier accuracy and feature Frechet distance.

    .venv/bin/python -m mmaccel.benchmarks.bench_flexdit [--quick] [--write] [--only speed|distill|zoo]
"""

from __future__ import annotations

import argparse
import functools

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from torch.utils import flop_counter

from mmaccel.benchmarks.harness import RESULTS_DIR, PeakTensorBytes, append_results, compare
from mmaccel.diffusion.flexdit import FlexDiTConfig, FlexDiTTransformer2DModel, convert_to_flexdit
from mmaccel.diffusion.train import DistillConfig, LatentDataset, distill, distillation_loss
from mmaccel.runtime.budget import LinearSchedule
from mmaccel.runtime.metrics import psnr, relative_l2
from mmaccel.runtime.tables import markdown_table

RESULTS = RESULTS_DIR / "flexdit.md"


def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def flops_and_peak(fn) -> tuple[int, int]:
    """FLOPs (CPU scaled-dot-product attention included) and peak activation bytes of one call."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with (
        flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter,
        PeakTensorBytes() as mem,
    ):
        fn()
    return counter.get_total_flops(), mem.peak


@torch.no_grad()
def sample(model: torch.nn.Module, steps: int, size: int, label: int = 207, seed: int = 0) -> torch.Tensor:
    """A short class-conditional DDIM run (no CFG) from fixed noise; returns the final latents."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([label])
    for t in scheduler.timesteps:
        eps = model(latents, t.expand(1), labels).sample[:, :4]
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def _forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return model(x, t, label).sample


def _dit(size: int, depth: int, heads: int, head_dim: int, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                  out_channels=8, num_layers=depth, sample_size=size, patch_size=2)  # fmt: skip
    return model.eval().requires_grad_(False)


def speed_table(quick: bool) -> tuple[str, list[str]]:
    # full: DiT-XL/2 at 512 px (64x64x4 latent); quick: width 384 at 256 px, same depth and layout.
    size, heads, head_dim, grid = (32, 6, 64, (4, 4)) if quick else (64, 16, 72, (8, 8))
    repeats, steps = (5, 2) if quick else (5, 3)
    dense = _dit(size, 28, heads, head_dim)
    flex = convert_to_flexdit(dense, FlexDiTConfig(sparse_grid=grid))
    sched = convert_to_flexdit(dense, FlexDiTConfig(sparse_grid=grid, schedule=LinearSchedule(0.25, 1.0)))
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([207])
    tokens = (size // 2) ** 2
    settings: list[tuple[str, torch.nn.Module, int]] = [
        ("dense DiT", dense, 500),
        (f"FlexDiT, sparse {grid[0]}x{grid[1]}", flex, 500),
        (f"FlexDiT + linear schedule 0.25->1, t=999 ({grid[0] // 2}x{grid[1] // 2})", sched, 999),
    ]
    calls = [functools.partial(_forward, model, x, torch.tensor([t]), label) for _, model, t in settings]
    # harness.compare: per-setting warm-up, then interleaved rounds (order rotated), median ratio with min-max.
    result = list(compare({name: call for (name, _, _), call in zip(settings, calls)}, repeats=repeats).values())
    with torch.no_grad():
        ref_out = dense(x, torch.tensor([500]), label).sample
        ref_latents = sample(dense, steps, size)
    rows, base = [], None
    for (name, model, t), call, cmp in zip(settings, calls, result):
        flops, peak = flops_and_peak(call)
        if isinstance(model, FlexDiTTransformer2DModel):
            query_tokens = sum(c.queries for c in model.token_counts((size // 2, size // 2), t))
        else:
            query_tokens = tokens * 28
        base = base or (flops, peak, query_tokens)
        if model is dense:
            fid_out, fid_lat = "ref", "ref"
        else:
            with torch.no_grad():
                out = model(x, torch.tensor([500]), label).sample
                latents = sample(model, steps, size)
            fid_out = f"{psnr(out, ref_out):.1f} dB (rel err {relative_l2(out, ref_out):.2f})"
            fid_lat = f"{psnr(latents, ref_latents):.1f} dB"
        rows.append([
            name, cmp.time_text(), "1.00x (ref)" if model is dense else cmp.ratio_text(), f"{flops / 1e9:.0f}",
            f"{100 * (1 - flops / base[0]):.0f}%", f"{peak / 2**20:.0f}", f"{peak / base[1]:.2f}",
            f"{query_tokens / base[2]:.2f}", fid_out, fid_lat,
        ])  # fmt: skip
        print(rows[-1], flush=True)
    headers = ["setting", "forward s (median, min-max)", "speed-up (median, min-max)", "GFLOPs", "FLOPs saved", "peak activations MiB", "vs dense",
               "query tokens vs dense", "output PSNR vs dense (t=500)", f"latent PSNR after {steps} DDIM steps"]  # fmt: skip
    shape = f"{tokens} tokens, width {heads * head_dim}, 28 blocks"
    notes = [
        f"Model: DiT-shaped ({shape}), random weights, batch 1, fp32, {torch.get_num_threads()} threads; "
        f"harness.compare: one warm-up per setting, {repeats} interleaved rounds (order rotated), median "
        "speed-up with min-max, ~noise where the time ranges overlap. Peak activations: largest total of "
        "live tensors created during one forward (weights excluded).",
        "Targets: FlexDiT layout >= 2.5x forward speed and -55% FLOPs vs dense.",
        "Fidelity is of the converted model *before* fine-tuning; poor values are expected: each SDTM's "
        "dense output starts as its dense input plus a cross-attention read of the sparse tokens.",
    ]
    return markdown_table(headers, rows), notes


def distill_table(quick: bool) -> tuple[str, list[str]]:
    """Output fidelity of a tiny FlexDiT before and after distillation against its dense teacher."""
    rounds, steps = (1, 60) if quick else (3, 100)
    teacher = _dit(16, 6, 2, 16)
    cfg = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=1,
                        sparse_grid=(4, 4))  # fmt: skip
    student = convert_to_flexdit(teacher, cfg)
    data = LatentDataset.synthetic(teacher, 1024, seed=0)
    held_out = LatentDataset.synthetic(teacher, 16, seed=1).tensors
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x, t, y = held_out["latents"], torch.full((16,), 500), held_out["class_labels"]

    def row(name: str) -> list[str]:
        with torch.no_grad():
            loss, _ = distillation_loss(
                student, teacher, held_out, scheduler, torch.Generator().manual_seed(9)
            )
            out, ref = student(x, t, y).sample, teacher(x, t, y).sample
        return [name, f"{loss.item():.4f}", f"{psnr(out, ref):.1f}", f"{relative_l2(out, ref):.3f}"]

    rows = [row("converted, no training")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster
    try:
        for r in range(rounds):
            config = DistillConfig(steps=steps, batch_size=16, learning_rate=1e-3, label_dropout=0.0, seed=r)
            distill(student, teacher, data, config, scheduler)
            rows.append(row(f"after {(r + 1) * steps} distillation steps"))
    finally:
        torch.set_num_threads(threads)
    notes = ["Tiny DiT (6 blocks, width 32, 8x8 tokens; 1 Poolingformer, 1 SDTM with a 4x4 sparse grid, 1 dense), "
             "1,024 synthetic latents, batch 16, lr 1e-3; held-out batch of 16 (loss over random t, PSNR at t=500)."]  # fmt: skip
    return markdown_table(["student", "held-out distill loss", "output PSNR dB", "rel err"], rows), notes


def zoo_table(quick: bool) -> tuple[str, list[str]]:
    """Sample fidelity of FlexDiT on the trained zoo Digits DiT, before and after distillation."""
    from diffusers import DiTPipeline

    from mmaccel.apps.zoo import digits_dit
    from mmaccel.apps.zoo.digits import digit_images, digit_split, load_digit_classifier

    rounds, steps = (1, 30) if quick else (2, 300)
    pipe = digits_dit.load()
    teacher = pipe.transformer
    clf = load_digit_classifier()
    labels = torch.arange(10).repeat_interleave(2 if quick else 20)
    images, classes = digit_images(32)
    train_idx, _ = digit_split()
    with torch.no_grad():
        latents = pipe.vae.encode(images[train_idx] * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    data = LatentDataset({"latents": latents, "class_labels": classes[train_idx]})
    cfg = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=1,
                        sparse_grid=(4, 4))  # fmt: skip
    student = convert_to_flexdit(teacher, cfg).eval()
    grid = (teacher.config.sample_size,) * 2
    dense_tokens = grid[0] * grid[1] * teacher.config.num_layers
    query_ratio = sum(c.queries for c in student.token_counts(grid, 500)) / dense_tokens

    def generate(model: torch.nn.Module) -> torch.Tensor:
        model_pipe = DiTPipeline(transformer=model, vae=pipe.vae, scheduler=pipe.scheduler)
        model_pipe.set_progress_bar_config(disable=True)
        return digits_dit.generate(model_pipe, labels.tolist())

    ref = generate(teacher)
    rows = []

    def row(name: str, tokens: float, model: torch.nn.Module | None) -> None:
        """Sample with ``model`` (None: the dense teacher) and time it against the teacher with
        harness.compare (one warm-up each, 5 interleaved rounds)."""
        if model is None:
            samples, speed, seconds = ref, "1.00x (ref)", "-"
        else:
            out: dict[str, torch.Tensor] = {}
            result = compare({"dense": lambda: generate(teacher),
                              "flexdit": lambda: out.__setitem__("s", generate(model))})  # fmt: skip
            samples, speed = out["s"], result["flexdit"].ratio_text()
            seconds = f"{result['flexdit'].time_text()} vs dense {result['dense'].time_text()}"
        m = digits_dit.sample_metrics(samples, labels, reference=ref, classifier=clf)
        rows.append([
            name, f"{tokens:.3f}", seconds, speed, f"{m['PSNR dB vs reference']:.1f}",
            f"{m['SSIM vs reference']:.3f}", f"{m['sample accuracy']:.3f}", f"{m['sample FD vs test digits']:.2f}",
        ])  # fmt: skip

    row("dense", 1.0, None)
    row("FlexDiT converted, no training", query_ratio, student)
    threads = torch.get_num_threads()
    for r in range(rounds):
        config = DistillConfig(steps=steps, batch_size=32, learning_rate=1e-3, label_dropout=0.1, seed=r)
        torch.set_num_threads(1)  # tiny model: one thread trains faster; every row is timed at `threads`
        try:
            distill(student, teacher, data, config, progress=False)
        finally:
            torch.set_num_threads(threads)
        student.eval().requires_grad_(False)
        row(f"FlexDiT after {(r + 1) * steps} distillation steps", query_ratio, student)
    notes = [
        f"Zoo model `digits-dit` ({teacher.config.num_layers} blocks, {grid[0]}x{grid[1]} tokens) as teacher; "
        "FlexDiT layout 1 Poolingformer, 1 SDTM (1 cross, 1 sparse, 1 recovery, 1 dense) with a 4x4 sparse "
        "grid, 1 dense block; distilled on the VAE latents (posterior means) of the 1,437 training digits, "
        "batch 32, lr 1e-3, 10% label dropout. Query tokens counted per forward (`token_counts`). Samples: "
        f"{len(labels)} digits ({len(labels) // 10} per class), DPM-Solver++ "
        f"{digits_dit.SAMPLING['num_inference_steps']} steps, guidance {digits_dit.SAMPLING['guidance_scale']}, "
        "noise of seed i for sample i in every row; wall time of the whole sampling run, each row timed "
        "against the dense teacher with harness.compare (a warm-up each, 5 interleaved rounds, median "
        "speed-up with min-max; machine shared)."
    ]
    headers = ["transformer", "query tokens vs dense", "sampling s (median, min-max)", "speed-up (median, min-max)", "PSNR dB vs dense",
               "SSIM vs dense", "classifier accuracy", "FD vs test digits"]  # fmt: skip
    return markdown_table(headers, rows), notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 1 min)")
    parser.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    parser.add_argument("--threads", type=int, help="torch threads for the timing (default: torch's)")
    parser.add_argument("--only", choices=("speed", "distill", "zoo"), help="run one table only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tag = " (quick)" if args.quick else ""
    tables = [
        ("speed", f"FlexDiT layout vs dense DiT{tag}", speed_table),
        ("distill", f"FlexDiT distillation on a tiny DiT{tag}", distill_table),
        ("zoo", f"FlexDiT fidelity on the zoo Digits DiT{tag}", zoo_table),
    ]
    for key, title, make in tables:
        if args.only and key != args.only:
            continue
        table, notes = make(args.quick)
        print(f"\n## {title}\n", table, *notes, sep="\n")
        if args.write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            append_results(title, table, "\n".join(notes), path=RESULTS)


if __name__ == "__main__":
    main()
