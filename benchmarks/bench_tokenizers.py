"""Tokenizer benchmark: reconstruction fidelity and speed of the 2-D VQ vs the 1-D compact tokenizer.

Both tokenizers (LlamaGen-architecture VQ, downsample 4, codebook 512 x 8; TiTok/FlexTok-style 1-D
tokenizer, 32 tokens, codebook 512 x 8, nested dropout; both with dead-code restarts) are trained from scratch on CPU for the same
number of steps on 32 x 32 random crops of 12 ``skimage.data`` images, and evaluated on crops
of a held-out photograph (``chelsea``). Reported per tokenizer / prefix length: tokens per
image and the ratio to the 2-D grid (what an autoregressive generator must produce), held-out
PSNR before and after training, distinct codes used on the held-out crops, and encode + decode images/s and peak memory as ratios vs the
2-D VQ measured in the same run. A first row gives the PSNR of predicting each crop's mean
colour, the floor a useful tokenizer must beat. One torch thread (the machine is shared; tiny models are
latency-bound).

A fidelity table follows for the trained zoo tokenizer (``digits-nar``: the same VQ architecture,
1 channel, codebook 64, trained on digits): PSNR, codes used, and the zoo digit classifier's
accuracy and feature Frechet distance on its reconstructions of the 360 held-out digits.

    .venv/bin/python -m mmaccel.benchmarks.bench_tokenizers [--quick] [--write] [--fidelity-only]
"""

from __future__ import annotations

import argparse

import torch

from mmaccel.apps.zoo import digits_nar
from mmaccel.benchmarks.harness import RESULTS_DIR, append_results, measure
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table
from mmaccel.tokenizers_img.compact_1d import Compact1DTokenizer
from mmaccel.tokenizers_img.train_tokenizer import (
    load_images,
    psnr,
    sample_crops,
    tiny_compact_config,
    tiny_vq_config,
    train,
)
from mmaccel.tokenizers_img.vq import VQModel

RESULTS = RESULTS_DIR / "tokenizers.md"


def zoo_fidelity() -> tuple[str, str]:
    """Reconstruction fidelity of the trained zoo VQ (``digits-nar``) on the 360 held-out digits."""
    models = digits_nar.load()
    quality = digits_nar.evaluate(models, orders=())
    vq = models.tokenizer
    grid = digits_nar.GRID
    row = [
        "2-D VQ of zoo `digits-nar` (trained)",
        f"{grid}x{grid}",
        grid * grid,
        sum(p.numel() for p in vq.parameters()) / 1e6,
        vq.config.codebook_size,
        quality["VQ codes used on test digits (of 64)"],
        quality["VQ PSNR on test digits (dB)"],
        quality["classifier accuracy of VQ reconstructions"],
        quality["FD of VQ reconstructions vs test digits (floor)"],
    ]
    headers = ["tokenizer", "tokens", "tokens/img", "params (M)", "codebook", "codes used", "PSNR (dB)",
               "classifier accuracy of reconstructions", "FD vs test digits"]  # fmt: skip
    notes = (
        "Trained weights from `mmaccel zoo path digits-nar` (32x32 digits in [0, 1], PSNR with peak 1); "
        "evaluated on the 360 held-out digits of `mmaccel.apps.zoo.digits.digit_split()`. Classifier: the zoo "
        "`digit-classifier`; FD: Frechet distance of its features, reconstructions vs the real digits."
    )
    return markdown_table(headers, [row]), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 training steps instead of 250")
    parser.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    parser.add_argument("--fidelity-only", action="store_true", help="only the zoo tokenizer table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.fidelity_only:
        compare(args)
    table, notes = zoo_fidelity()
    print(f"{table}\n\n{notes}")
    if args.write:
        append_results("Zoo tokenizer fidelity (digits-nar VQ)", table, notes, RESULTS)


def compare(args: argparse.Namespace) -> None:
    """Train the 2-D VQ and the 1-D tokenizer for the same steps and compare them."""
    steps, size, batch = (20, 32, 16) if args.quick else (250, 32, 16)

    train_images = load_images("skimage", "train")
    eval_batch = sample_crops(load_images("skimage", "eval"), 32, size, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    vq = VQModel(tiny_vq_config())
    torch.manual_seed(0)
    compact = Compact1DTokenizer(tiny_compact_config(image_size=size))
    k_max = compact.config.num_latent_tokens
    lengths = (1, 4, 8, 16, k_max)

    vq_report = train(vq, train_images, eval_batch, steps, batch)
    c_report = train(compact, train_images, eval_batch, steps, batch, prefix_lengths=lengths)

    @torch.no_grad()
    def vq_roundtrip() -> torch.Tensor:
        return vq.decode(vq.encode(eval_batch))

    def compact_roundtrip(k: int):
        @torch.no_grad()
        def run() -> torch.Tensor:
            return compact.decode(compact.encode(eval_batch)[:, :k])

        return run

    grid = size // vq.downsample_factor
    base = measure(vq_roundtrip, repeats=5, warmup=1)
    n = eval_batch.shape[0]
    with torch.no_grad():
        vq_codes, c_ids = vq.encode(eval_batch).unique().numel(), compact.encode(eval_batch)
    mean_colour = psnr(eval_batch.mean((2, 3), keepdim=True).expand_as(eval_batch), eval_batch)
    rows = [
        ["mean colour of each crop (floor)", "-", "-", "-", "-", "-", mean_colour, "-", "-", "-", "-", "-"],
        ["2-D VQ (LlamaGen arch.)", f"{grid}x{grid}", grid * grid, 1.0, sum(p.numel() for p in vq.parameters()) / 1e6,
         vq_report.psnr_before["psnr"], vq_report.psnr_after["psnr"], vq_codes, n / base.median_s, 1.0, 1.0,
         vq_report.seconds / steps],
    ]
    params = sum(p.numel() for p in compact.parameters()) / 1e6
    for k in lengths:
        m = measure(compact_roundtrip(k), repeats=5, warmup=1)
        rows.append([
            "1-D compact (nested dropout)", f"k={k}", k, k / (grid * grid), params,
            c_report.psnr_before[f"k={k}"], c_report.psnr_after[f"k={k}"], c_ids[:, :k].unique().numel(),
            n / m.median_s, base.median_s / m.median_s, m.peak_bytes / max(base.peak_bytes, 1),
            c_report.seconds / steps,
        ])
    headers = ["tokenizer", "tokens", "tokens/img", "tokens vs 2-D", "params (M)", "PSNR before (dB)",
               "PSNR after (dB)", "codes used", "enc+dec img/s", "speed vs 2-D", "peak mem vs 2-D", "train s/step"]
    table = markdown_table(headers, rows)
    notes = (
        f"{steps} Adam steps (lr 1e-3, cosine decay), batch {batch}, {size}x{size} crops of 12 skimage images; "
        f"PSNR on {n} crops of held-out `chelsea` through the discrete tokens; speed = encode + decode of "
        f"{n} images, median of 5, 1 thread; loss = MSE + quantiser terms (no LPIPS/GAN). "
        "Machine shared with other jobs; absolute numbers are noisy, ratios are from one run."
    )
    print(f"Machine: {machine_description()}\n\n{table}\n\n{notes}")
    if args.write:
        append_results("Image tokenizers: 2-D VQ vs 1-D compact" + (" (quick)" if args.quick else ""), table, notes, RESULTS)


if __name__ == "__main__":
    main()
