"""torch.compile (inductor, CPU) vs eager: dense DiT, FlexDiT and DyDiT forward times.

A DiT-shaped transformer (width 384, 6 heads, 12 blocks, 256 px = 16x16 tokens; ``--quick``:
width 192, 3 heads, 6 blocks, 128 px = 8x8 tokens) with random weights, batch 1, fp32, t = 500.
FlexDiT: 2 Poolingformer blocks + SDTMs of (1, 1, 1, 1) blocks (sparse grid half the token grid
per side) + the rest dense. DyDiT: width-only (``dynamic_tokens=False``, the setting that compiles with 0 graph breaks
under the default dynamo config), routers fixed to keep the first 2/3 of the head and MLP groups.
The accelerated models are converted from the dense one.

Every ratio comes from :func:`mmaccel.benchmarks.harness.compare`: each variant is warmed up on
its own (the compiled ones compile there), then all are timed in >= 5 interleaved rounds; the
table shows each forward's median time and the median speed-up over eager dense with its min-max.

    .venv/bin/python -m mmaccel.benchmarks.bench_compile [--quick] [--write] [--repeats 5]
"""

from __future__ import annotations

import copy
import functools
import time
import types
from collections.abc import Callable

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from mmaccel.benchmarks.harness import RESULTS_DIR, compare, parse_timing_args, timing_parser
from mmaccel.diffusion.dydit import DyDiTConfig, DyDiTTransformer2DModel, convert_to_dydit
from mmaccel.diffusion.flexdit import FlexDiTConfig, convert_to_flexdit
from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density, count_flops
from mmaccel.runtime.budget import ConstantSchedule
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table
from mmaccel.testing.hotpath import count_hot_path

RESULTS = RESULTS_DIR / "compile.md"
TIMESTEP = 500
KEEP_GROUPS = 2 / 3


def _shape(quick: bool) -> dict[str, int]:
    if quick:
        return dict(heads=3, layers=6, sample=16)
    return dict(heads=6, layers=12, sample=32)


def _dense(quick: bool) -> DiTTransformer2DModel:
    s = _shape(quick)
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=s["heads"], attention_head_dim=64, in_channels=4,
                                 out_channels=8, num_layers=s["layers"], sample_size=s["sample"],
                                 patch_size=2).eval()  # fmt: skip


def _flexdit_config(quick: bool) -> FlexDiTConfig:
    s = _shape(quick)
    side = s["sample"] // 2 // 2
    modules = (s["layers"] - 2) // 4
    return FlexDiTConfig(pooling_blocks=2, num_modules=modules, module_layout=(1, 1, 1, 1),
                         top_dense_blocks=s["layers"] - 2 - 4 * modules, sparse_grid=(side, side))  # fmt: skip


@torch.no_grad()
def _fix_widths(model: DyDiTTransformer2DModel, keep: float) -> None:
    """Routers that keep the first ``keep`` of the head and MLP groups of every block, any timestep."""
    for router in model.routers:
        for layer in (router.head, router.mlp):
            groups = layer.bias.numel()
            layer.weight.zero_()
            layer.bias.copy_(torch.where(torch.arange(groups) < round(keep * groups), 10.0, -10.0))
    model.clear_cache()


@torch.no_grad()
def _forward(model: torch.nn.Module, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return model(x, torch.tensor([TIMESTEP]), label, return_dict=False)[0]


def run(quick: bool, repeats: int) -> str:
    dense = _dense(quick)
    flex = convert_to_flexdit(dense, _flexdit_config(quick))
    dydit = convert_to_dydit(dense, DyDiTConfig(dynamic_tokens=False))
    _fix_widths(dydit, KEEP_GROUPS)
    s = _shape(quick)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, s["sample"], s["sample"], generator=gen)
    label = torch.tensor([1])
    models = {"dense DiT": dense, "FlexDiT": flex, "DyDiT width-only": dydit}
    fns, compile_s = {}, {}
    for name, model in models.items():
        fns[f"{name}, eager"] = functools.partial(_forward, model, x, label)
        compiled = torch.compile(model, backend="inductor")
        start = time.perf_counter()
        fns[f"{name}, compiled"] = functools.partial(_forward, compiled, x, label)
        fns[f"{name}, compiled"]()  # first call compiles; compare's warm-up then runs it warm
        compile_s[name] = time.perf_counter() - start
    result = compare(fns, repeats=repeats, warmup=1)
    rows = []
    for name in models:
        eager, compiled = result[f"{name}, eager"], result[f"{name}, compiled"]
        for variant, cmp in (("eager", eager), ("inductor", compiled)):
            rows.append([
                name, variant, f"{compile_s[name]:.0f} s" if variant == "inductor" else "-",
                cmp.time_text(), cmp.ratio_text(),
                "-" if variant == "eager" else f"{eager.median_s / compiled.median_s:.2f}x",
            ])  # fmt: skip
    headers = ["model", "mode", "first call (compile)", "forward (median, min-max)",
               "speed-up vs eager dense (median, min-max)", "compiled / own eager (medians)"]  # fmt: skip
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    parser = timing_parser(__doc__.splitlines()[0], "width 192, 6 blocks, 8x8 tokens (about a minute)", RESULTS)
    parser.add_argument("--shape", choices=("dit", "pixart-16k", "wan-32k", "dit-xl-regional"), default="dit",
                        help="dit: dense/FlexDiT/DyDiT, 256 tokens; pixart-16k: PixArt-Sigma-shaped 2048 px "
                             "(16,384 tokens), dense/token density/FlexDiT/DyDiT with FLOPs and time ratios; "
                             "wan-32k: Wan-1.3B-shaped 480p (32,760 tokens), dense/token density; "
                             "dit-xl-regional: regional compile time of DiT-XL/2")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="pixart-16k, wan-32k: cpu or cuda (the GPU step)")
    args = parse_timing_args(parser, argv)
    if args.shape == "pixart-16k":
        latent = 64 if args.quick else 256
        shape = (f"PixArt-Sigma-shaped, width 64, 2 heads, 4 blocks, {(latent // 2) ** 2} tokens "
                 f"({latent * 8} px), 8 text tokens")  # fmt: skip
        table = run_16k(args.quick, args.repeats, args.device)
    elif args.shape == "dit-xl-regional":
        shape = "DiT-XL/2 (28 blocks), 512 px = 1,024 tokens, regional compilation (inductor)"
        table = run_dit_xl_regional(args.quick)
    elif args.shape == "wan-32k":
        tokens = 384 if args.quick else 32760
        shape = f"Wan-1.3B-shaped, width 64, 2 heads, 4 blocks, {tokens} tokens, 16 text tokens"
        table = run_wan_32k(args.quick, args.repeats, args.device)
    else:
        s = _shape(args.quick)
        shape = (f"width {s['heads'] * 64}, {s['heads']} heads, {s['layers']} blocks, "
                 f"{(s['sample'] // 2) ** 2} tokens")  # fmt: skip
        table = run(args.quick, args.repeats)
    text = (f"### {'--quick' if args.quick else 'full'}: {shape}, random weights, batch 1, fp32, t={TIMESTEP}, "
            f"{'one sample' if args.shape == 'dit-xl-regional' else f'{args.repeats} interleaved rounds'}\n\nMachine: {machine_description()}, "
            f"torch threads {torch.get_num_threads()}\n\n{table}\n")  # fmt: skip
    print(text)
    if args.write:
        if not RESULTS.exists():
            RESULTS.write_text("## torch.compile vs eager (inductor, CPU)\n\nPrinted by "
                               "`python -m mmaccel.benchmarks.bench_compile`.\n")  # fmt: skip
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return text


# ------------------------------------------------------------------------------------------
# --shape pixart-16k: where token reduction pays (16,384 tokens), FLOPs ratio beside time ratio
# ------------------------------------------------------------------------------------------

#: PixArt-Sigma-shaped at 2048 px: 256x256x4 latent, patch 2 -> 128x128 = 16,384 tokens; narrow and
#: shallow so a CPU run takes minutes (``--quick``: 64x64 latent, 1,024 tokens)
PIXART_16K = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
                  patch_size=2, cross_attention_dim=64, caption_channels=32, attention_bias=True,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                  norm_elementwise_affine=False, norm_eps=1e-6)  # fmt: skip
#: the reduced step every variant is timed at (one scheduler timestep, read on the host)
SCHEDULER_16K = types.SimpleNamespace(timesteps=torch.tensor([TIMESTEP], dtype=torch.float32))
TARGET_SHARE = 0.85  # time ratio >= 85% of the FLOPs ratio


def _pixart(latent: int) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(**PIXART_16K, sample_size=latent).eval()


def _reduced_variants(dense: PixArtTransformer2DModel, grid: int) -> dict[str, torch.nn.Module]:
    """Token density (1 pooled + 2 sparse_q blocks at keep 0.25), FlexDiT (1 Poolingformer, one
    SDTM to a grid/4 sparse grid, 1 dense) and DyDiT at lambda ~ 0.5 (half the heads and MLP groups,
    fixed token capacity 0.5): each a separate copy of ``dense``, reading SCHEDULER_16K on the host."""
    density = copy.deepcopy(dense)
    apply_token_density(density, TokenDensityConfig(pooled_blocks=(0, 1), sparse_blocks=(1, 3),
                                                    schedule=ConstantSchedule(0.25)), scheduler=SCHEDULER_16K)  # fmt: skip
    flex = convert_to_flexdit(dense, FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 0, 1, 0),
                                                   top_dense_blocks=1, sparse_grid=(grid // 4, grid // 4)))  # fmt: skip
    dydit = convert_to_dydit(dense, DyDiTConfig())
    _fix_widths(dydit, 0.5)
    dydit.set_token_capacity(0.5)
    flex, dydit = flex.to(dense.device), dydit.to(dense.device)
    for model in (flex, dydit):
        model.use_scheduler_timesteps(SCHEDULER_16K)
    return {"token density": density, "FlexDiT": flex, "DyDiT": dydit}


@torch.no_grad()
def _pixart_forward(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(x, encoder_hidden_states=text, timestep=SCHEDULER_16K.timesteps[0].expand(1),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]  # fmt: skip


def run_16k(quick: bool, repeats: int, device: str = "cpu") -> str:
    """The --shape pixart-16k table; ``device="cuda"`` for the GPU step (same models, CUDA timing)."""
    latent = 64 if quick else 256
    grid = latent // 2
    SCHEDULER_16K.timesteps = SCHEDULER_16K.timesteps.to(device)
    dense = _pixart(latent).to(device)
    models = {"dense": dense, **_reduced_variants(dense, grid)}
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, latent, latent, generator=gen), torch.randn(1, 8, 32, generator=gen)
    x, text = x.to(device), text.to(device)
    return _ratio_table(models, lambda m: functools.partial(_pixart_forward, m, x, text), repeats, device)


#: Wan 2.1 1.3B-shaped at 480p, 81 frames: latent 16 x 21 x 60 x 104, patch (1, 2, 2) -> 21 x 30 x 52
#: = 32,760 tokens; narrow (2 heads x 32) and 4 blocks so a CPU run takes minutes
#: (``--quick``: 16 x 3 x 16 x 16 -> 384 tokens)
WAN_32K = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
               text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # fmt: skip


@torch.no_grad()
def _wan_forward(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(x, timestep=SCHEDULER_16K.timesteps[0].expand(1), encoder_hidden_states=text, return_dict=False)[0]


def run_wan_32k(quick: bool, repeats: int, device: str = "cpu") -> str:
    """The --shape wan-32k table: dense vs token density (1 pooled + 2 sparse_q blocks, keep 0.25,
    window (1, 2, 2)); FlexDiT and DyDiT convert DiT/PixArt only."""
    from diffusers import WanTransformer3DModel

    shape = (1, 16, 3, 16, 16) if quick else (1, 16, 21, 60, 104)
    SCHEDULER_16K.timesteps = SCHEDULER_16K.timesteps.to(device)
    torch.manual_seed(0)
    dense = WanTransformer3DModel(**WAN_32K).eval().to(device)
    density = copy.deepcopy(dense)
    apply_token_density(density, TokenDensityConfig(factor=(1, 2, 2), pooled_blocks=(0, 1), sparse_blocks=(1, 3),
                                                    schedule=ConstantSchedule(0.25)), scheduler=SCHEDULER_16K)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(shape, generator=gen).to(device), torch.randn(1, 16, 64, generator=gen).to(device)
    models = {"dense": dense, "token density": density}
    return _ratio_table(models, lambda m: functools.partial(_wan_forward, m, x, text), repeats, device)


@torch.no_grad()
def run_dit_xl_regional(quick: bool) -> str:
    """Regional compile time of DiT-XL/2 (28 blocks, width 1152, 512 px = 1,024 tokens; ``--quick``:
    width 144): `mmaccel.diffusion.compile_repeated_blocks` with inductor; compile time = first
    compiled call minus a warm compiled call (one sample each: a single-run figure)."""
    from mmaccel.diffusion import compile_repeated_blocks

    torch.manual_seed(0)
    heads = 2 if quick else 16
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=28, sample_size=64, patch_size=2).eval()  # fmt: skip
    x, t, y = torch.randn(1, 4, 64, 64), torch.tensor([float(TIMESTEP)]), torch.tensor([1])
    start = time.perf_counter()
    model(x, t, y)
    eager = time.perf_counter() - start
    regions = compile_repeated_blocks(model, backend="inductor")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model(x, t, y)
        times.append(time.perf_counter() - start)
    rows = [[f"DiT-XL/2 depth, width {heads * 72}", str(regions), f"{eager:.1f} s", f"{times[0]:.1f} s",
             f"{times[1]:.1f} s", f"{times[0] - times[1]:.0f} s"]]  # fmt: skip
    headers = ["model", "compiled regions", "eager forward", "first compiled call", "warm compiled call",
               "compile time (first - warm)"]  # fmt: skip
    return markdown_table(headers, rows)


def _ratio_table(
    models: dict[str, torch.nn.Module], call: Callable[[torch.nn.Module], Callable[[], object]], repeats: int,
    device: str,
) -> str:
    """Per model and mode (eager, inductor): FLOPs, FLOPs ratio, time ratio vs dense in the same mode
    (`compare`), the 85% verdict and the host-device syncs of one eager forward."""
    flops, syncs, compile_s, fns = {}, {}, {}, {}
    for name, model in models.items():
        _, flops[name] = count_flops(call(model))
        syncs[name] = count_hot_path(call(model)).syncs
    for mode in ("eager", "inductor"):
        for name, model in models.items():
            fn = model if mode == "eager" else torch.compile(model, backend="inductor")
            fns[f"{name}, {mode}"] = call(fn)
            if mode == "inductor":
                start = time.perf_counter()
                fns[f"{name}, {mode}"]()  # the first call compiles
                compile_s[name] = time.perf_counter() - start
    rows = []
    for mode in ("eager", "inductor"):
        result = compare({k: v for k, v in fns.items() if k.endswith(mode)}, repeats=repeats, warmup=1, device=device)
        for name in models:
            cmp = result[f"{name}, {mode}"]
            flops_ratio = flops["dense"] / flops[name]
            share = cmp.ratio / flops_ratio
            verdict = "-" if name == "dense" else (
                f"{'met' if share >= TARGET_SHARE else 'missed'} ({share:.0%})")  # fmt: skip
            rows.append([name, mode, f"{compile_s[name]:.0f} s" if mode == "inductor" else "-",
                         f"{flops[name] / 1e9:.1f}", f"{flops_ratio:.2f}x", cmp.time_text(), cmp.ratio_text(),
                         verdict, str(syncs[name])])  # fmt: skip
    headers = ["model", "mode", "first call (compile)", "GFLOPs", "FLOPs ratio (dense / this)",
               "forward (median, min-max)", "time ratio vs dense, same mode (median, min-max)",
               f"time >= {TARGET_SHARE:.0%} of FLOPs ratio", "host-device syncs per forward"]  # fmt: skip
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
