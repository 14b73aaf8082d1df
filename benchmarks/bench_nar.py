"""NAR vs raster (and PAR-4X-style) decoding speed of a LlamaGen GPT with random weights.

    .venv/bin/python -m benchmarks.bench_nar            # GPT-B, 16x16 and 24x24, batch 1 and 8
    .venv/bin/python -m benchmarks.bench_nar --quick    # a small GPT, small grids (< 1 min)
    .venv/bin/python -m benchmarks.bench_nar --write    # append the table to benchmarks/results/nar.md

All orders run on the same model with KV cache, in the same process; speed-ups and memory are
ratios against raster decoding of the same grid and batch. Besides wall-clock time the table
gives the process CPU time per batch, which other jobs on a shared machine disturb less.
Target: NAR >= 6x images/s over raster at 24x24.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import RESULTS_DIR, append_results, markdown_table, measure
from tokenizers_img.decoding import decode
from tokenizers_img.gpt import GPT, GPTConfig
from tokenizers_img.orders import nar_schedule, par_schedule, raster_schedule
from tokenizers_img.sampling import SamplingConfig

ORDERS = {"raster": raster_schedule, "nar": nar_schedule, "par-4x": lambda h, w: par_schedule(h, w, 2)}
TARGET = 6.0
HEADERS = [
    "grid",
    "batch",
    "order",
    "forwards",
    "wall s / batch",
    "images/s",
    "speed-up vs raster (wall)",
    "CPU s / batch",
    "speed-up vs raster (CPU)",
    "peak MiB",
    "memory vs raster",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="NAR vs raster decoding benchmark")
    parser.add_argument("--quick", action="store_true", help="small GPT and grids, < 1 min")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/results/nar.md")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG scale (> 1 doubles the batch)")
    parser.add_argument("--grids", type=int, nargs="+", help="square grid sides (default 16 24; quick 8 12)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; quick 1 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

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
            base = None
            for name, make in ORDERS.items():
                schedule = make(grid, grid)
                gen = torch.Generator().manual_seed(0)
                cpu: list[float] = []

                def run(s=schedule, g=gen, c=cond, cpu=cpu) -> None:
                    start = time.process_time()
                    decode(model, c, s, sampling, generator=g)
                    cpu.append(time.process_time() - start)

                m = measure(run, args.repeats, 0)
                cpu_s = statistics.median(cpu)
                base = base or (m, cpu_s)
                wall_x, cpu_x = base[0].median_s / m.median_s, base[1] / cpu_s
                if name == "nar":
                    speedups[(grid, batch)] = (wall_x, cpu_x)
                rows.append(
                    [
                        f"{grid}x{grid}",
                        batch,
                        name,
                        schedule.forward_passes,
                        m.median_s,
                        batch / m.median_s,
                        wall_x,
                        cpu_s,
                        cpu_x,
                        m.peak_bytes / 2**20,
                        m.peak_bytes / max(base[0].peak_bytes, 1),
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
        f"cfg {args.cfg}, {args.threads} CPU thread(s), median of {args.repeats} run(s). "
        f"Target NAR >= {TARGET}x images/s over raster at {big}x{big}: " + "; ".join(verdicts) + ". "
        "Peak memory is the resident-set growth during the call (CPU; memory the allocator kept "
        "from earlier cases is not counted again)."
    )
    print(table)
    print(notes)
    if args.write:
        title = "NAR decoding (quick)" if args.quick else "NAR decoding"
        append_results(title, table, notes, path=RESULTS_DIR / "nar.md")


if __name__ == "__main__":
    main()
