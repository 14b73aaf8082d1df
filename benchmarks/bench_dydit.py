"""DyDiT vs dense, FlexDiT and training-free token density at equal FLOPs: forward time and FLOPs.

DiT-XL/2-shaped transformer at 512 px (32x32 = 1,024 tokens, 28 blocks, width 1152, 16 heads)
with random weights, batch 1, fp32, t = 500 (``--quick``: width 384, 6 heads, 256 px). Random
weights have no trained routers, so DyDiT's decisions are set to a fixed operating point per
lambda: the first ``g`` of the head / MLP-channel groups of every block (TDW) and a fraction of the
tokens through each MLP (SDT, the token router's bias calibrated on this input); ``g`` is the group
count for which the token fraction that lands exactly on lambda is nearest 80%. The DyDiT models
share the dense model's weights (pruned slices are cached per pattern, as after ``precompute``).
FlexDiT layouts and the token-density (ToMe merge) keep ratio are chosen to land at the same FLOPs
(each row prints its counted FLOPs).

Every ratio comes from :func:`mmaccel.benchmarks.harness.compare`: per lambda group, dense and the
three methods are warmed up, then timed in >= 5 interleaved rounds; the table shows the median
speed-up with its min-max. FLOPs are counted with ``torch.utils.flop_counter`` (CPU SDPA included).

    .venv/bin/python -m mmaccel.benchmarks.bench_dydit [--quick] [--write] [--repeats 5]
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

import torch
from diffusers import DiTTransformer2DModel

from mmaccel.benchmarks.harness import RESULTS_DIR, compare, parse_timing_args, timing_parser
from mmaccel.diffusion.dydit import DyDiTConfig, DyDiTTransformer2DModel, convert_to_dydit
from mmaccel.diffusion.flexdit import FlexDiTConfig, convert_to_flexdit
from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density, count_flops
from mmaccel.runtime.budget import ConstantSchedule
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table

RESULTS = RESULTS_DIR / "dydit.md"
TOKEN_FRACTION = 0.8
TIMESTEP = 500


def _dit(size: int, heads: int, head_dim: int, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                  out_channels=8, num_layers=28, sample_size=size, patch_size=2)  # fmt: skip
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _forward(model: torch.nn.Module, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return model(x, torch.tensor([TIMESTEP]), label).sample


def _operating_point(model: DyDiTTransformer2DModel, n: int, target: float) -> tuple[int, float]:
    """(groups kept per block for heads and MLP alike, token fraction through the MLPs) landing on
    ``target``: FLOPs are affine in the token fraction, so for each group count solve for it and keep
    the solution nearest 80% tokens."""
    dense = model.dense_flops(n)
    best = (model.head_groups, 1.0)
    for g in range(1, model.head_groups + 1):
        heads, channels = g * model.heads // model.head_groups, g * model.ff_dim // model.mlp_groups

        def ratio(k: float, heads: int = heads, channels: int = channels) -> float:
            per = model.block_flops(n, 0, heads, channels, k * n)
            return (model.stem_flops(n, 0) + len(model.transformer_blocks) * per) / dense

        lo, hi = ratio(0.0), ratio(1.0)
        if hi <= lo:
            continue
        k = (target - lo) / (hi - lo)
        if 0.3 <= k <= 1.0 and abs(k - TOKEN_FRACTION) < abs(best[1] - TOKEN_FRACTION):
            best = (g, k)
    return best


@torch.no_grad()
def _fix_decisions(
    model: DyDiTTransformer2DModel, groups: int, tokens: float, forward: Callable[[], object]
) -> None:
    """Keep the first ``groups`` head/MLP groups everywhere; calibrate token routers to ``tokens`` on
    the input of ``forward()`` (one forward of ``model``)."""
    for router in model.routers:
        for layer in (router.head, router.mlp):
            layer.weight.zero_()
            layer.bias.fill_(-10.0)
            layer.bias[:groups] = 10.0

    def calibrate(module: torch.nn.Module, args: tuple) -> None:
        logits = torch.nn.functional.linear(args[0], module.weight).flatten()
        module.bias.fill_(-float(torch.quantile(logits, 1 - tokens)) + 1e-4)

    hooks = [r.token[2].register_forward_pre_hook(calibrate) for r in model.routers]
    model.clear_cache()
    forward()
    for h in hooks:
        h.remove()
    model.clear_cache()
    model.stats.reset()


def _share_weights(dydit: DyDiTTransformer2DModel, dense: DiTTransformer2DModel) -> None:
    """Point the DyDiT model at the dense model's modules (no second copy of the weights)."""
    dydit.transformer_blocks = dense.transformer_blocks
    for name in ("pos_embed", "norm_out", "proj_out_1", "proj_out_2"):
        setattr(dydit, name, getattr(dense, name))


def _flexdit_config(target: float, side: int) -> FlexDiTConfig:
    """FlexDiT layouts whose FLOPs land near lambda 0.5 / 0.7 at DiT-XL depth (28 blocks)."""
    if target >= 0.6:  # 2 pooling + 2 SDTMs (2, 2, 1, 1) with an 8x8 grid + 14 dense blocks
        return FlexDiTConfig(num_modules=2, top_dense_blocks=14, sparse_grid=(side // 4, side // 4))
    return FlexDiTConfig(sparse_grid=(3 * side // 8, 3 * side // 8))  # paper layout, 12x12 grid at 512 px


def _td_keep(dense: DiTTransformer2DModel, x, label, target: float) -> tuple[float, int]:
    """Token-density (ToMe merge) keep ratio for ``target``: FLOPs are affine in the keep ratio, so two
    counts (keep 1 and keep 0.25) fix it."""
    dense_flops = count_flops(lambda: _forward(dense, x, label))[1]
    with apply_token_density(dense, TokenDensityConfig(reducer="merge", schedule=ConstantSchedule(0.25))):
        low = count_flops(lambda: _forward(dense, x, label))[1]
    keep = 0.25 + (target * dense_flops - low) / (dense_flops - low) * 0.75
    return min(1.0, max(0.25, keep)), dense_flops


def _with_td(dense, keep: float, x, label):
    with apply_token_density(dense, TokenDensityConfig(reducer="merge", schedule=ConstantSchedule(keep))):
        return _forward(dense, x, label)


def run(quick: bool, repeats: int) -> str:
    size, heads, head_dim = (32, 6, 64) if quick else (64, 16, 72)
    side = size // 2
    n = side * side
    dense = _dit(size, heads, head_dim)
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([207])
    rows = []
    for target in (0.7, 0.5):
        dydit = convert_to_dydit(dense, DyDiTConfig(target_flops_ratio=target))
        _share_weights(dydit, dense)
        gc.collect()
        groups, tokens = _operating_point(dydit, n, target)
        _fix_decisions(dydit, groups, tokens, functools.partial(_forward, dydit, x, label))
        flex = convert_to_flexdit(dense, _flexdit_config(target, side))
        keep, dense_flops = _td_keep(dense, x, label, target)
        fns = {
            "dense DiT": functools.partial(_forward, dense, x, label),
            f"DyDiT lambda={target}": functools.partial(_forward, dydit, x, label),
            "FlexDiT": functools.partial(_forward, flex, x, label),
            "token density (ToMe merge)": functools.partial(_with_td, dense, keep, x, label),
        }
        flops = {name: count_flops(fn)[1] for name, fn in fns.items()}
        dydit.stats.reset()
        result = compare(fns, repeats=repeats, warmup=1)
        step = dydit.stats.steps[-1]
        detail = {
            "dense DiT": "-",
            f"DyDiT lambda={target}": f"{groups}/{dydit.head_groups} head+MLP groups, "
            f"{sum(step['tokens']) / len(step['tokens']) / n:.0%} tokens in MLPs",
            "FlexDiT": (lambda c: f"{c.pooling_blocks} pool + {c.num_modules} SDTM{c.module_layout} "
                        f"+ {c.top_dense_blocks} dense, grid {c.sparse_grid[0]}x{c.sparse_grid[1]}")(flex.flex),  # fmt: skip
            "token density (ToMe merge)": f"keep {keep:.2f}, auto layout",
        }
        for name, cmp in result.items():
            ratio = flops[name] / dense_flops
            speed = cmp.ratio
            rows.append([
                f"lambda {target}" if name != "dense DiT" else f"(group {target})", name, detail[name],
                f"{flops[name] / 1e9:.1f}", f"{ratio:.3f}", cmp.time_text(), cmp.ratio_text(),
                "-" if name == "dense DiT" else f"{speed / (1 / ratio):.0%}",
            ])  # fmt: skip
        del dydit, flex, fns, result
        gc.collect()
    headers = ["group", "method", "setting", "GFLOPs", "FLOPs ratio", "forward (median, min-max)",
               "speed-up (median, min-max)", "speed-up / (1/FLOPs ratio)"]  # fmt: skip
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    parser = timing_parser(__doc__.splitlines()[0], "width 384, 256 px (minutes, not tens of minutes)", RESULTS)
    args = parse_timing_args(parser, argv)
    shape = "width 384, 6 heads, 256 px (256 tokens)" if args.quick else "DiT-XL/2 512 px (1,024 tokens, width 1152)"
    table = run(args.quick, args.repeats)
    text = (f"### {'--quick' if args.quick else 'full'}: {shape}, 28 blocks, random weights, batch 1, fp32, "
            f"t={TIMESTEP}, {args.repeats} interleaved rounds\n\nMachine: {machine_description()}, "
            f"torch threads {torch.get_num_threads()}\n\n{table}\n")  # fmt: skip
    print(text)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
