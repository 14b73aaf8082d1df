"""NAR vs raster (and PAR-4X-style) decoding speed of a LlamaGen GPT with random weights, then
fidelity: raster vs NAR samples of the trained zoo model ``digits-nar``.

    .venv/bin/python -m mmaccel.benchmarks.bench_nar            # GPT-B, 16x16 and 24x24, batch 1 and 8
    .venv/bin/python -m mmaccel.benchmarks.bench_nar --quick    # a small GPT, small grids (< 1 min)
    .venv/bin/python -m mmaccel.benchmarks.bench_nar --write    # append the tables to benchmarks/results/nar.md
    .venv/bin/python -m mmaccel.benchmarks.bench_nar --fidelity-only   # only the zoo-model section

All orders run on the same model with KV cache, in the same process; speed-ups and memory are
ratios against raster decoding of the same grid and batch, from :func:`harness.compare`
(per-order warm-up, >= 5 interleaved rounds, median with min-max spread). Besides wall-clock time
the table gives the process CPU time per batch, which other jobs on a shared machine disturb less.
Target: NAR >= 6x images/s over raster at 24x24.

Fidelity: the zoo's raster and NAR GPTs (same depth and data, 8x8 tokens of its VQ tokenizer)
generate the same classes with the same seed and CFG; the zoo digit classifier scores the decoded
digits (accuracy on the requested class, Frechet distance of its features to the 360 held-out
digits; the VQ reconstructions of those digits give the floor), next to images/s and forward passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mmaccel.apps.zoo import digits_nar
from mmaccel.benchmarks.harness import MIN_REPEATS, RESULTS_DIR, Comparison, append_results, compare
from mmaccel.runtime.tables import markdown_table
from mmaccel.tokenizers_img.decoding import decode
from mmaccel.tokenizers_img.gpt import GPT, GPTConfig
from mmaccel.tokenizers_img.orders import nar_schedule, par_schedule, raster_schedule
from mmaccel.tokenizers_img.sampling import SamplingConfig

ORDERS = {"raster": raster_schedule, "nar": nar_schedule, "par-4x": lambda h, w: par_schedule(h, w, 2)}
TARGET = 6.0
HEADERS = [
    "grid",
    "batch",
    "order",
    "forwards",
    "wall s / batch (min-max)",
    "images/s",
    "speed-up vs raster (wall, min-max)",
    "CPU s / batch",
    "speed-up vs raster (CPU)",
    "peak MiB",
    "memory vs raster",
]


FIDELITY_HEADERS = [
    "samples of",
    "forwards",
    "images",
    "classifier accuracy",
    "FD vs test digits",
    "held-out bits/token",
    "wall s / batch (min-max)",
    "images/s",
    "speed-up vs raster (wall, min-max)",
    "CPU s / batch",
    "speed-up vs raster (CPU)",
    "batch-1 images/s",
    "batch-1 speed-up vs raster (wall, min-max)",
]


def fidelity(per_class: int, repeats: int) -> tuple[str, str]:
    """Raster vs NAR sample quality and speed on the zoo model ``digits-nar``: (table, notes)."""
    models = digits_nar.load()
    quality = digits_nar.evaluate(models, samples_per_class=per_class, seed=0)
    want = torch.arange(10).repeat_interleave(per_class)
    rows: list[list[object]] = [
        [
            "VQ reconstructions of the test digits (floor)",
            "-",
            360,
            quality["classifier accuracy of VQ reconstructions"],
            quality["FD of VQ reconstructions vs test digits (floor)"],
            *["-"] * 8,
        ]
    ]
    timed = {n: _timed_orders({o: _generation(models, labels, o) for o in ("raster", "nar")}, repeats)
             for n, labels in ((len(want), want), (1, want[:1]))}
    for order in ("raster", "nar"):
        (run, cpu_s, cpu_x), (run_1, _, _) = timed[len(want)][order], timed[1][order]
        rows.append(
            [
                f"{order} GPT, {order} decoding",
                quality[f"{order}: forward passes per batch"],
                len(want),
                quality[f"{order}: classifier accuracy of samples"],
                quality[f"{order}: FD of samples vs test digits"],
                quality[f"{order}: held-out bits/token"],
                run.time_text(),
                len(want) / run.median_s,
                run.ratio_text(),
                cpu_s,
                cpu_x,
                1 / run_1.median_s,
                run_1.ratio_text(),
            ]
        )
        print(*rows[-1], flush=True)
    notes = (
        f"Zoo model `digits-nar` (trained weights, `mmaccel zoo path digits-nar`): 8x8 tokens of its VQ "
        f"(codebook 64), GPTs of 5 blocks x 64 wide (NAR: 4 trunk + 1 column block). {per_class} samples "
        f"per digit in one batch, generator seed 0, CFG {digits_nar.CFG_SCALE}, multinomial sampling; "
        "accuracy and FD from the zoo digit classifier against the 360 held-out digits; bits/token of "
        "those digits' tokens in each model's own order. FD grows as the sample count shrinks (compare "
        "only at equal counts). The NAR GPT decoded in raster order scores "
        f"{quality['NAR model decoded in raster order: held-out bits/token']:.2f} bits/token, hence a "
        f"separate raster GPT. Timing: the same generation (all samples in one batch, CFG doubles it; and "
        f"one digit alone), median of {repeats} interleaved rounds after a warm-up (min-max in brackets; "
        f"~noise: the time ranges overlap), {torch.get_num_threads()} thread(s)."
    )
    return markdown_table(FIDELITY_HEADERS, rows), notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="NAR vs raster decoding benchmark")
    parser.add_argument("--quick", action="store_true", help="small GPT and grids, < 1 min")
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/results/nar.md")
    parser.add_argument(
        "--fidelity-only", action="store_true", help="skip the random-weight speed table, run only fidelity"
    )
    parser.add_argument(
        "--repeats", type=int, default=MIN_REPEATS, help=f"interleaved rounds per case (>= {MIN_REPEATS})"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG scale (> 1 doubles the batch)")
    parser.add_argument("--grids", type=int, nargs="+", help="square grid sides (default 16 24; quick 8 12)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; quick 1 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.fidelity_only:
        speed(args)
    table, notes = fidelity(5 if args.quick else 20, args.repeats)
    print(table)
    print(notes)
    if args.write:
        title = "NAR fidelity on the zoo model digits-nar" + (" (quick)" if args.quick else "")
        append_results(title, table, notes, path=RESULTS_DIR / "nar.md")


def speed(args: argparse.Namespace) -> None:
    """The random-weight decoding-speed table (raster, NAR, PAR-4X)."""
    if args.quick:
        config = GPTConfig(vocab_size=4096, dim=256, n_layer=4, n_head=4)
        model_desc = "small GPT (4 layers, 256 wide, vocab 4096, +1 NAR column block)"
        grids, batches = args.grids or [8, 12], args.batches or [1, 4]
    else:
        config = GPTConfig.preset("B")
        model_desc = "GPT-B (12 layers, 768 wide, 12 heads, vocab 16384, +1 NAR column block)"
        grids, batches = args.grids or [16, 24], args.batches or [1, 8]
    torch.manual_seed(0)
    model = GPT(config).eval()
    sampling = SamplingConfig(top_k=2000, cfg_scale=args.cfg)
    decode(model, torch.zeros(1, dtype=torch.long), nar_schedule(4, 4), sampling)  # warm up kernels

    rows = []
    speedups: dict[tuple[int, int], tuple[float, float]] = {}
    for grid in grids:
        for batch in batches:
            cond = torch.arange(batch) % config.num_classes
            runs = {
                name: _decoding(model, cond, make(grid, grid), sampling, torch.Generator().manual_seed(0))
                for name, make in ORDERS.items()
            }
            timed = _timed_orders(runs, args.repeats, memory=True)
            base_peak = timed["raster"][0].peak_bytes
            for name, (run, cpu_s, cpu_x) in timed.items():
                if name == "nar":
                    speedups[(grid, batch)] = (run.ratio, cpu_x)
                rows.append(
                    [
                        f"{grid}x{grid}",
                        batch,
                        name,
                        runs[name].forwards,
                        run.time_text(),
                        batch / run.median_s,
                        run.ratio_text(),
                        cpu_s,
                        cpu_x,
                        run.peak_bytes / 2**20,
                        run.peak_bytes / max(base_peak, 1),
                    ]
                )
                print(*rows[-1], flush=True)
    table = markdown_table(HEADERS, rows)
    big = max(grids)
    verdicts = [
        f"batch {b}: NAR {speedups[(big, b)][0]:.2f}x wall / {speedups[(big, b)][1]:.2f}x CPU "
        f"({'met' if speedups[(big, b)][0] >= TARGET else 'missed'})"
        for b in batches
    ]
    notes = (
        f"{model_desc}, random weights, float32, KV cache for every order, top-k 2000 sampling, "
        f"cfg {args.cfg}, {args.threads} CPU thread(s), median of {args.repeats} interleaved rounds after a "
        "warm-up per order (min-max in brackets; ~noise: the time ranges overlap). "
        f"Target NAR >= {TARGET}x images/s over raster at {big}x{big}: " + "; ".join(verdicts) + ". "
        "Peak memory: peak live tensor storage during one untimed call (activations and KV cache)."
    )
    print(table)
    print(notes)
    if args.write:
        title = "NAR decoding (quick)" if args.quick else "NAR decoding"
        append_results(title, table, notes, path=RESULTS_DIR / "nar.md")


class _CPUTimed:
    """A zero-argument callable that records the process CPU time of each call."""

    def __init__(self, fn: Callable[[], object], forwards: int = 0) -> None:
        self.fn, self.forwards, self.cpu_s = fn, forwards, []

    def __call__(self) -> None:
        start = time.process_time()
        self.fn()
        self.cpu_s.append(time.process_time() - start)


def _decoding(model: GPT, cond: torch.Tensor, schedule, sampling: SamplingConfig, gen: torch.Generator) -> _CPUTimed:
    return _CPUTimed(lambda: decode(model, cond, schedule, sampling, generator=gen), schedule.forward_passes)


def _generation(models, labels: torch.Tensor, order: str) -> _CPUTimed:
    return _CPUTimed(lambda: digits_nar.generate(models, labels, order, generator=torch.Generator().manual_seed(0)))


def _timed_orders(
    runs: dict[str, _CPUTimed], repeats: int, memory: bool = False
) -> dict[str, tuple[Comparison, float, float]]:
    """:func:`compare` the runs (the first is the baseline): per run its comparison, the median CPU
    seconds of its timed rounds, and the baseline's median CPU time over it."""
    timed = compare(runs, repeats=repeats, memory=memory)
    cpu = {name: statistics.median(run.cpu_s[1 : 1 + repeats]) for name, run in runs.items()}  # after warm-up
    first = next(iter(runs))
    return {name: (timed[name], cpu[name], cpu[first] / cpu[name]) for name in runs}


if __name__ == "__main__":
    main()
