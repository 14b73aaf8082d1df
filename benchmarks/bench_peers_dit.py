"""Peers in the same run: token density, FlexDiT, DyDiT vs ToMe, FirstBlockCache and MagCache on DiT / PixArt / Wan.

What a diffusers user would pick instead of our techniques, measured on the same random-weight
model, the same noise and the same short sampling loop (caches act across steps, so whole
sampling runs are timed, never single forwards):

- **DiT**: DiT-XL/2-shaped ``DiTTransformer2DModel`` (width 1152, 16 heads x 72, MLP 4x, patch 2)
  at 256 px (32x32x4 latent, 16x16 = 256 tokens), 8 of its 28 blocks, class 207, 10 DDIM steps.
- **PixArt**: PixArt-alpha-shaped ``PixArtTransformer2DModel`` (width 1152, 16 heads, adaLN-single,
  cross-attention to 120 caption tokens of width 4096) at 256 px (256 tokens), 8 of 28 blocks,
  10 DPM-Solver++ steps.
- **Wan**: Wan 2.1 1.3B-shaped ``WanTransformer3DModel`` (width 1536, 12 heads x 128, FFN 8960,
  512 text tokens of width 4096) on a 16 x 2 x 32 x 32 latent (2 x 16 x 16 = 512 tokens), 3 of
  its 30 blocks, 6 flow-matching Euler steps (shift 3).
- **Wan large** (``--only wan-large``, issue #28: where token reduction pays): the same Wan 2.1
  block on the 480p latent aspect of Wan-1.3B (21 x 60 x 104, 32,760 tokens) scaled to 4 x 48 x 84
  (4 x 24 x 42 = 4,032 tokens), width scaled with it (2 heads x 128 = 256, FFN 1536; tokens over
  width 16 against 21 at 480p, so attention keeps most of a forward), 512 text tokens of width
  4096, 3 blocks, 6 steps as above.

All batch 1, fp32, no classifier-free guidance, random weights. A fourth section runs the same rows
(less FlexDiT / DyDiT, which need fine-tuning first) on the trained zoo model `digits-dit` (6 blocks,
64 tokens, 100 samples, its DPM-Solver++ 20 steps with guidance 2) and adds the zoo digit
classifier's accuracy and feature Frechet distance; that tiny model is timed on 1 thread (on a
shared 2-core machine two threads mostly spin-wait at 64 tokens). Rows (each installs its technique, samples, and
removes it, inside the timed call; installing hooks costs microseconds):

- *token density*: ``TokenDensityConfig()`` defaults (pool 2x2, sparse_q, auto layout, keep 0.25
  until progress 0.8, dense after); video factor (1, 2, 2).
- *FlexDiT* (DiT, PixArt): ``convert_to_flexdit``, 1 Poolingformer + 1 SDTM (2, 2, 1, 1) + 1 dense
  block, sparse grid 8x8, *untrained* (its SDTMs need fine-tuning; fidelity is poor by construction).
- *DyDiT lambda 0.7* (DiT, PixArt): ``convert_to_dydit``, random-weight routers replaced by
  decisions fixed at the target as ``bench_dydit`` does (first g head/MLP groups, token router
  calibrated on the first step's input), *untrained*.
- *ToMe*: tomesd's rule (bipartite soft matching, one random destination per 2x2 cell, ratio 0.5)
  applied in every block through token density's merge reducer:
  ``TokenDensityConfig(reducer="merge", pooled_blocks=(0, depth), sparse_blocks=None,
  schedule=ConstantSchedule(0.5))``. The merge is computed per block from its input and the whole
  block (self-attention, cross-attention, MLP) runs on the merged tokens, its update unmerged onto
  the full-resolution residual: tomesd's ``merge_attn + merge_crossattn + merge_mlp``, except that
  tomesd merges after ``norm1`` and we merge before it.
- *FirstBlockCache*: ``diffusers.hooks.apply_first_block_cache`` at diffusers' default threshold
  0.05 and at 0.25 (more steps skipped), with the cache context set by hand (DiT and PixArt have no ``CacheMixin`` in diffusers
  0.42; ``CacheMixin.enable_cache`` calls the same function for Wan).
- *MagCache*: ``apply_mag_cache`` with magnitude ratios calibrated in this run
  (``MagCacheConfig(calibrate=True)`` on one dense sampling run of this model), then diffusers'
  defaults (threshold 0.06, retention 0.2, at most 3 skipped steps in a row).
- combinations: *token density + FirstBlockCache 0.25*, *token density + MagCache* (default
  token density: the fast preset before issue #28), the *fast preset*
  (``mmaccel.diffusion.apply_fast``: the family's ``fast_token_density`` + MagCache as above, ours)
  and *ToMe + MagCache* (peer): the token reduction applied first, then the cache (the order that
  composes, see tests/test_compose_diffusion.py).

Every speed ratio comes from :func:`mmaccel.benchmarks.harness.compare` (each row warmed up on its
own, then >= 5 interleaved rounds with the order rotated; median dense/variant with min-max,
``~noise`` where the time ranges overlap). Fidelity: PSNR and SSIM of the final latents against the
dense run's (SSIM per 2-D latent slice, data range of the dense latents). "full steps" counts the
sampling steps that ran the last block (a cache skips it). For each of our rows the best peer in
the same run is the fastest peer row (ToMe, FirstBlockCache, MagCache, ToMe + MagCache) whose PSNR is at most 0.5 dB below
ours (matched quality); if none is, the peer of nearest PSNR, and the verdict says the quality gap.
Below each table, the issue #28 target line compares the fast preset with the peer the issue
names (ToMe + MagCache on PixArt and Wan: >= 1.2x at equal or better PSNR; MagCache alone on the
zoo: ahead at classifier accuracy >= 0.97) and prints met / missed.

``seed`` of the builders sets the noise (and text) of a run; the preset was chosen on seed 7
(PixArt, Wan) and 1000 (zoo), the benchmark runs the defaults (1, 1, 0).

``--breakdown`` prints, instead of the tables, where the whole-run time of the issue #28 rows goes:
each transformer forward timed, its FLOPs counted, and sorted into full dense, full reduced and
cache-skipped, with the steps the cache ran, FLOPs and time ratios vs dense, and the PSNR (`breakdown`).

    .venv/bin/python -m mmaccel.benchmarks.bench_peers_dit [--quick] [--write] [--threads 2]
        [--only dit|zoo|wan|pixart|wan-large] [--breakdown]
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch.utils.flop_counter import FlopCounterMode

from mmaccel.benchmarks.bench_dydit import _fix_decisions, _operating_point
from mmaccel.benchmarks.harness import RESULTS_DIR, Comparison, compare, parse_timing_args, timing_parser
from mmaccel.diffusion.dydit import DyDiTConfig, convert_to_dydit
from mmaccel.diffusion.flexdit import FlexDiTConfig, convert_to_flexdit
from mmaccel.diffusion.presets import FastConfig, apply_fast, fast_token_density
from mmaccel.diffusion.token_density import TokenDensityConfig, _flop_counter, apply_token_density
from mmaccel.runtime.budget import ConstantSchedule
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.metrics import psnr
from mmaccel.runtime.tables import markdown_table

RESULTS = RESULTS_DIR / "peers_dit.md"
OURS, PEER, BASE = "ours", "peer", "baseline"
FAST_ROW = "fast preset (token density + MagCache)"
OLD_FAST_ROW = "token density + MagCache"
#: issue #28: model -> (peer row, speed ratio the fast preset must exceed or reach, quality rule)
TARGETS = {"PixArt": ("ToMe + MagCache", 1.2, "psnr"), "Wan": ("ToMe + MagCache", 1.2, "psnr"),
           "Wan large": ("ToMe + MagCache", 1.2, "psnr"), "zoo Digits DiT": ("MagCache", 1.0, "accuracy")}  # fmt: skip
MIN_ACCURACY = 0.97
PEERS_MATCH_DB = 0.5  # a peer matches our quality if its PSNR is at most this far below ours
DYDIT_TARGET = 0.7
FBC_THRESHOLD = 0.05  # diffusers' default
FBC_LOOSE = 0.25  # a second, more aggressive operating point
TOME_KEEP = 0.5  # tomesd's default ratio 0.5


# ------------------------------------------------------------------------------------------
# Models and sampling loops
# ------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One model: its transformer, a sampler ``sample(model) -> final latents`` from fixed noise,
    the block list, the token grid factor for token density, and a description."""

    name: str
    model: torch.nn.Module
    sample: Callable[[torch.nn.Module], torch.Tensor]
    blocks: torch.nn.ModuleList
    factor: tuple[int, ...]
    steps: int
    shape: str
    forward_once: Callable[[torch.nn.Module], object] | None = None  # one forward at the first step (DyDiT)
    task_metric: Callable[[torch.Tensor, torch.Tensor], str] | None = None  # (output, dense output) -> text
    accuracy: Callable[[torch.Tensor], float] | None = None  # output -> classifier accuracy (zoo)
    threads: int | None = None  # torch threads for this model (None: the run's)


def _seeded(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn().eval().requires_grad_(False)


def _loop(scheduler, steps: int, noise: torch.Tensor, denoise: Callable) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    latents = noise.clone()
    for t in scheduler.timesteps:
        latents = scheduler.step(denoise(latents, t), t, latents).prev_sample
    return latents


def _dit(quick: bool, seed: int = 1) -> Setup:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    heads, head_dim, size, steps = (2, 32, 16, 4) if quick else (16, 72, 32, 10)
    model = _seeded(lambda: DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=8,
        sample_size=size, patch_size=2))  # fmt: skip
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    label = torch.tensor([207])

    @torch.no_grad()
    def sample(m: torch.nn.Module) -> torch.Tensor:
        sched = DDIMScheduler(num_train_timesteps=1000)
        return _loop(sched, steps, noise, lambda x, t: m(x, timestep=t.reshape(1), class_labels=label).sample[:, :4])

    @torch.no_grad()
    def forward_once(m: torch.nn.Module) -> object:
        return m(noise, timestep=torch.tensor([900]), class_labels=label).sample

    return Setup("DiT", model, sample, model.transformer_blocks, (2, 2), steps,
                 f"DiT-XL/2-shaped (width {heads * head_dim}, {heads} heads), {size * 8} px = {(size // 2) ** 2} "
                 f"tokens, 8 blocks, {steps} DDIM steps, class 207", forward_once)  # fmt: skip


def _pixart(quick: bool, seed: int = 1) -> Setup:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    heads, head_dim, size, steps, text_w, text_n = (2, 32, 16, 4, 64, 16) if quick else (16, 72, 32, 10, 4096, 120)
    model = _seeded(lambda: PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=8,
        sample_size=size, patch_size=2, cross_attention_dim=heads * head_dim, caption_channels=text_w,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, size, size, generator=gen)
    text = torch.randn(1, text_n, text_w, generator=gen)
    cond = {"resolution": None, "aspect_ratio": None}

    def call(m, x, t):
        return m(x, encoder_hidden_states=text, timestep=t.reshape(1), added_cond_kwargs=cond).sample[:, :4]

    @torch.no_grad()
    def sample(m: torch.nn.Module) -> torch.Tensor:
        return _loop(DPMSolverMultistepScheduler(), steps, noise, lambda x, t: call(m, x, t))

    return Setup("PixArt", model, sample, model.transformer_blocks, (2, 2), steps,
                 f"PixArt-alpha-shaped (width {heads * head_dim}, {heads} heads, {text_n} caption tokens x {text_w}), "
                 f"{size * 8} px = {(size // 2) ** 2} tokens, 8 blocks, {steps} DPM-Solver++ steps",
                 torch.no_grad()(lambda m: call(m, noise, torch.tensor(900))))  # fmt: skip


#: ``--only wan-large``: the Wan-1.3B 480p latent aspect (60 x 104, 21 frames) scaled to 4 x 48 x 84
#: (4 x 24 x 42 = 4,032 tokens) at a width scaled with it (2 heads x 128, FFN 6x), so that tokens
#: over width (16) and attention's share of a forward stay near the real 480p model's (32,760 tokens
#: over width 1,536: 21) and a whole 6-step run of every row fits minutes on 2 CPU threads
WAN_LARGE = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=1536, text_dim=4096, freq_dim=256)
WAN_LARGE_LATENT = (1, 16, 4, 48, 84)


def _wan(quick: bool, seed: int = 1, large: bool = False) -> Setup:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    if quick:
        dims = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=256, text_dim=64, freq_dim=64)
        steps, text_n, shape = 4, 16, ((1, 16, 2, 16, 24) if large else (1, 16, 2, 16, 16))
    elif large:
        dims, steps, text_n, shape = WAN_LARGE, 6, 512, WAN_LARGE_LATENT
    else:
        dims = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)
        steps, text_n, shape = 6, 512, (1, 16, 2, 32, 32)
    model = _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True, num_layers=3,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, **dims))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    text = torch.randn(1, text_n, dims["text_dim"], generator=gen)

    @torch.no_grad()
    def sample(m: torch.nn.Module) -> torch.Tensor:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return _loop(sched, steps, noise, lambda x, t: m(x, timestep=t.reshape(1), encoder_hidden_states=text).sample)

    tokens = shape[2] * shape[3] * shape[4] // 4
    heads = dims["num_attention_heads"]
    width = heads * dims["attention_head_dim"]
    kind = "Wan 2.1 1.3B 480p aspect, narrow" if large else "Wan 2.1 1.3B-shaped"
    return Setup("Wan large" if large else "Wan", model, sample, model.blocks, (1, 2, 2), steps,
                 f"{kind} (width {width}{f', {heads} heads' if large else ''}, FFN {dims['ffn_dim']}, {text_n} text "
                 f"tokens), latent {'x'.join(map(str, shape[1:]))} = {tokens} tokens, 3 blocks, {steps} "
                 "flow-matching Euler steps")  # fmt: skip


def _wan_large(quick: bool, seed: int = 1) -> Setup:
    return _wan(quick, seed, large=True)


def _zoo(quick: bool, seed: int = 0) -> Setup:
    """The trained zoo Digits DiT through its own pipeline (DPM-Solver++, guidance 2): caches and token
    reduction on a model whose steps really are redundant. FlexDiT / DyDiT need fine-tuning first
    (bench_flexdit / the zoo's digits-dydit): not run here."""
    from mmaccel.apps.zoo import digits_dit
    from mmaccel.apps.zoo.digits import load_digit_classifier

    pipe = digits_dit.load()
    pipe.set_progress_bar_config(disable=True)
    clf = load_digit_classifier()
    labels = torch.arange(10).repeat_interleave(1 if quick else 10)
    steps = 4 if quick else digits_dit.SAMPLING["num_inference_steps"]

    def sample(m: torch.nn.Module) -> torch.Tensor:
        assert m is pipe.transformer
        return digits_dit.generate(pipe, labels.tolist(), num_inference_steps=steps, seed=seed)

    def task_metric(out: torch.Tensor, ref: torch.Tensor) -> str:
        m = digits_dit.sample_metrics(out, labels, classifier=clf)
        return f"accuracy {m['sample accuracy']:.2f}, FD {m['sample FD vs test digits']:.2f}"

    model = pipe.transformer
    return Setup("zoo Digits DiT", model, sample, model.transformer_blocks, (2, 2), steps,
                 f"trained `digits-dit` ({len(model.transformer_blocks)} blocks, 8x8 = 64 tokens), {len(labels)} "
                 f"samples ({len(labels) // 10} per digit), DPM-Solver++ {steps} steps, guidance "
                 f"{digits_dit.SAMPLING['guidance_scale']} (cond + uncond in one batch), images in [0, 1]",
                 task_metric=task_metric, accuracy=lambda out: digits_dit.sample_metrics(out, labels, classifier=clf)[
                     "sample accuracy"], threads=1)  # fmt: skip


BUILDERS = {"dit": _dit, "zoo": _zoo, "wan": _wan, "pixart": _pixart, "wan-large": _wan_large}


# ------------------------------------------------------------------------------------------
# Techniques, each a context manager installed around one sampling run
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _token_density(model: torch.nn.Module, config: TokenDensityConfig, record: dict) -> Iterator[None]:
    with apply_token_density(model, config) as handle:
        yield
        record["tokens"] = handle.stats.token_ratio
        record["step_tokens"] = [step.token_ratio for step in handle.stats.steps]


@contextlib.contextmanager
def _cache(model: torch.nn.Module, config: FirstBlockCacheConfig | MagCacheConfig) -> Iterator[None]:
    """A diffusers block cache on ``model`` for one sampling run, in a fresh state, with the cache
    context a pipeline would set (``CacheMixin.cache_context``)."""
    if isinstance(config, FirstBlockCacheConfig):
        apply_first_block_cache(model, config)
        names = ("fbc_leader_block_hook", "fbc_block_hook")
    else:
        apply_mag_cache(model, config)
        names = ("mag_cache_leader_block_hook", "mag_cache_block_hook")
    _set_cache_context(model, CacheContext("cond"))
    try:
        yield
    finally:
        _set_cache_context(model, None)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in names:
            registry.remove_hook(name, recurse=True)


@contextlib.contextmanager
def _fast(model: torch.nn.Module, steps: int, mag_ratios: list[float], record: dict) -> Iterator[None]:
    """The ``fast`` preset (token density, then MagCache with this run's ratios) for one sampling run."""
    with apply_fast(model, FastConfig(num_inference_steps=steps, mag_ratios=tuple(mag_ratios))) as handle:
        yield
        record["tokens"] = handle.stats.token_ratio
        record["step_tokens"] = [step.token_ratio for step in handle.stats.steps]


def calibrate_mag_ratios(setup: Setup) -> list[float]:
    """MagCache's own calibration (``MagCacheConfig(calibrate=True)``) over one dense sampling run:
    diffusers prints the ratios at the last step; they are read back from that print."""
    config = MagCacheConfig(calibrate=True, num_inference_steps=setup.steps)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), _cache(setup.model, config):
        setup.sample(setup.model)
    text = out.getvalue()
    start = text.rindex("[", 0, text.rindex("]") + 1)
    ratios = [float(v) for v in text[start + 1 : text.rindex("]")].split(",")]
    if len(ratios) != setup.steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {setup.steps} steps: {text!r}")
    return ratios


@dataclass
class Variant:
    name: str
    kind: str  # OURS, PEER or BASE
    setting: str
    run: Callable[[], torch.Tensor]
    record: dict = field(default_factory=dict)


def _flexdit(setup: Setup) -> torch.nn.Module:
    grid = setup.model.config.sample_size // 4  # a quarter of the tokens, as FlexDiT's 8x8 at 256 px
    return convert_to_flexdit(setup.model, FlexDiTConfig(pooling_blocks=1, num_modules=1, top_dense_blocks=1,
                                                         sparse_grid=(grid, grid))).eval()  # fmt: skip


def _dydit(setup: Setup) -> tuple[torch.nn.Module, str]:
    model = convert_to_dydit(setup.model, DyDiTConfig(target_flops_ratio=DYDIT_TARGET)).eval()
    n = (setup.model.config.sample_size // 2) ** 2
    groups, tokens = _operating_point(model, n, DYDIT_TARGET)
    _fix_decisions(model, groups, tokens, lambda: setup.forward_once(model))
    return model, f"{groups}/{model.head_groups} head+MLP groups, ~{tokens:.0%} tokens in MLPs, untrained"


def variants(setup: Setup, mag_ratios: list[float]) -> list[Variant]:
    model, depth = setup.model, len(setup.blocks)
    td = TokenDensityConfig(factor=setup.factor)
    tome = TokenDensityConfig(reducer="merge", factor=setup.factor, pooled_blocks=(0, depth), sparse_blocks=None,
                              schedule=ConstantSchedule(TOME_KEEP))  # fmt: skip
    fbc = FirstBlockCacheConfig(threshold=FBC_THRESHOLD)
    mag = MagCacheConfig(num_inference_steps=setup.steps, mag_ratios=mag_ratios)

    def with_ctx(make: Callable[[dict], contextlib.AbstractContextManager], record: dict) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with make(record):
                return setup.sample(model)

        return run

    out = [Variant("dense", BASE, "-", lambda: setup.sample(model))]
    rec: dict = {}
    out.append(Variant("token density", OURS, "default: pool 2x2, sparse_q, keep 0.25 until progress 0.8",
                       with_ctx(lambda r: _token_density(model, td, r), rec), rec))  # fmt: skip
    if setup.forward_once is not None:  # DiT-family only
        flex = _flexdit(setup)
        out.append(Variant("FlexDiT", OURS, f"1 pool + 1 SDTM{flex.flex.module_layout} + 1 dense, grid "
                           f"{flex.flex.sparse_grid[0]}x{flex.flex.sparse_grid[1]}, untrained",
                           lambda: setup.sample(flex)))  # fmt: skip
        dydit, text = _dydit(setup)
        out.append(Variant(f"DyDiT lambda={DYDIT_TARGET}", OURS, text, lambda: setup.sample(dydit)))
    rec = {}
    out.append(Variant("ToMe (tomesd rule)", PEER, f"merge 2x2 cells, ratio {1 - TOME_KEEP:g}, all {depth} blocks",
                       with_ctx(lambda r: _token_density(model, tome, r), rec), rec))  # fmt: skip
    out.append(Variant("FirstBlockCache", PEER, f"threshold {FBC_THRESHOLD}", with_ctx(lambda r: _cache(model, fbc), {})))
    loose = FirstBlockCacheConfig(threshold=FBC_LOOSE)
    out.append(Variant(f"FirstBlockCache {FBC_LOOSE}", PEER, f"threshold {FBC_LOOSE}",
                       with_ctx(lambda r: _cache(model, loose), {})))  # fmt: skip
    out.append(Variant("MagCache", PEER, f"calibrated ratios, threshold {mag.threshold}, retention "
                       f"{mag.retention_ratio}, K={mag.max_skip_steps}", with_ctx(lambda r: _cache(model, mag), {})))  # fmt: skip
    rec = {}
    ftd = fast_token_density(model)
    layout = [f"pooled blocks {ftd.pooled_blocks}"] if ftd.pooled_blocks else []
    layout += [f"sparse blocks {ftd.sparse_blocks} ({ftd.sparse_mode})"] if ftd.sparse_blocks else []
    sched = ftd.schedule
    out.append(Variant(FAST_ROW, OURS, f"apply_fast: {ftd.reducer} {'x'.join(map(str, ftd.factor))}, {', '.join(layout)}, "
                       f"keep {' / '.join(f'{r:g}' for r in sched.ratios)} split at progress "
                       f"{', '.join(f'{b:g}' for b in sched.boundaries)}; then MagCache as above",
                       with_ctx(lambda r: _fast(model, setup.steps, mag_ratios, r), rec), rec))  # fmt: skip
    combos = [  # (name, kind, setting, token reduction config, cache config)
        (f"token density + FirstBlockCache {FBC_LOOSE}", OURS, f"default token density, then FBC {FBC_LOOSE}", td, loose),
        (OLD_FAST_ROW, OURS, "default token density, then MagCache as above (the fast preset before #28)", td, mag),
        ("ToMe + MagCache", PEER, "ToMe as above, then MagCache as above", tome, mag),
    ]  # fmt: skip
    for name, kind, setting, cfg, cache in combos:
        rec = {}

        @contextlib.contextmanager
        def both(r: dict, cfg: TokenDensityConfig = cfg, cache=cache) -> Iterator[None]:
            with _token_density(model, cfg, r), _cache(model, cache):
                yield

        out.append(Variant(name, kind, setting, with_ctx(both, rec), rec))
    return out


# ------------------------------------------------------------------------------------------
# Fidelity, verdicts, table
# ------------------------------------------------------------------------------------------


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM over the 2-D (height, width) slices of the latents, data range of ``ref``."""
    from skimage.metrics import structural_similarity

    rng = float(ref.max() - ref.min())
    a = x.double().reshape(-1, *x.shape[-2:]).numpy()
    b = ref.double().reshape(-1, *ref.shape[-2:]).numpy()
    return float(np.mean([structural_similarity(u, v, data_range=rng) for u, v in zip(a, b)]))


@dataclass(frozen=True)
class Scored:
    name: str
    kind: str
    speed: float
    speed_min: float
    speed_max: float
    psnr: float


def best_peer(ours: Scored, rows: list[Scored], match_db: float = PEERS_MATCH_DB) -> tuple[Scored, bool] | None:
    """The fastest peer whose PSNR is at most ``match_db`` below ours (``matched=True``), else the
    peer of nearest PSNR (``matched=False``); ``None`` without peers."""
    peers = [r for r in rows if r.kind == PEER]
    if not peers:
        return None
    matched = [p for p in peers if p.psnr >= ours.psnr - match_db]
    if matched:
        return max(matched, key=lambda p: p.speed), True
    return min(peers, key=lambda p: abs(p.psnr - ours.psnr)), False


def verdict(ours: Scored, peer: Scored, matched: bool, match_db: float = PEERS_MATCH_DB) -> str:
    """``"ahead by 1.31x"`` / ``"behind by 1.31x"`` (speed, ours over the peer's median), with
    ``" (within spread)"`` where the min-max speed ranges overlap, and the PSNR gap wherever it is
    above ``match_db`` (a faster row at lower quality is not simply ahead). ``matched`` is
    `best_peer`'s flag; the gap is printed from the PSNRs either way."""
    r = ours.speed / peer.speed
    text = f"ahead by {r:.2f}x" if r >= 1 else f"behind by {1 / r:.2f}x"
    if ours.speed_min <= peer.speed_max and peer.speed_min <= ours.speed_max:
        text += " (within spread)"
    gap = ours.psnr - peer.psnr
    if abs(gap) > match_db or not matched:
        text += f", at {abs(gap):.1f} dB {'higher' if gap > 0 else 'lower'} quality"
    return text


def target_line(name: str, scored: dict[str, Scored], accuracy: dict[str, float]) -> str:
    """The issue #28 target of model ``name`` (`TARGETS`) with this run's numbers, met or missed;
    ``""`` where the issue sets none. ``accuracy``: classifier accuracy per row (the zoo)."""
    if name not in TARGETS:
        return ""
    peer_name, need, rule = TARGETS[name]
    ours, peer = scored[FAST_ROW], scored[peer_name]
    r = ours.speed / peer.speed
    fast_enough = r >= need if need > 1 else r > need
    overlap = ours.speed_min <= peer.speed_max and peer.speed_min <= ours.speed_max
    if rule == "psnr":
        quality_ok = ours.psnr >= peer.psnr
        quality = f"PSNR {_fmt_db(ours.psnr)} dB vs {_fmt_db(peer.psnr)} dB"
        wanted = "equal or better PSNR"
    else:
        quality_ok = accuracy[FAST_ROW] >= MIN_ACCURACY
        quality = f"accuracy {accuracy[FAST_ROW]:.2f} ({peer_name} {accuracy[peer_name]:.2f})"
        wanted = f"accuracy >= {MIN_ACCURACY}"
    verdict_text = "met" if fast_enough and quality_ok else "missed"
    return (f"Issue #28 target, fast preset vs {peer_name} ({'>=' if need > 1 else '>'} {need:g}x at {wanted}): "
            f"{r:.2f}x by the medians{' (min-max ranges overlap)' if overlap else ''}, {quality}: **{verdict_text}**")


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def bench(setup: Setup, repeats: int) -> str:
    mag_ratios = calibrate_mag_ratios(setup)
    rows = variants(setup, mag_ratios)
    outputs: dict[str, torch.Tensor] = {}
    calls = {"n": 0}
    hook = setup.blocks[-1].attn1.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    full_steps: dict[str, int] = {}

    def keep(v: Variant) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            calls["n"] = 0
            outputs[v.name] = v.run()
            full_steps[v.name] = calls["n"]
            return outputs[v.name]

        return fn

    try:
        result: dict[str, Comparison] = compare({v.name: keep(v) for v in rows}, repeats=repeats, warmup=1)
    finally:
        hook.remove()
    ref = outputs["dense"]
    scored = {v.name: Scored(v.name, v.kind, result[v.name].ratio, result[v.name].ratio_min,
                             result[v.name].ratio_max, psnr(outputs[v.name], ref)) for v in rows}  # fmt: skip
    table = []
    for v in rows:
        s, cmp = scored[v.name], result[v.name]
        peer = best_peer(s, list(scored.values())) if v.kind == OURS else None
        uses_last_block = v.name not in ("FlexDiT",) and not v.name.startswith("DyDiT")
        table.append([
            v.name, v.kind, v.setting, cmp.time_text(), "1.00x (ref)" if v.kind == BASE else cmp.ratio_text(),
            f"{full_steps[v.name]}/{setup.steps}" if uses_last_block else "-",
            f"{v.record['tokens']:.2f}" if "tokens" in v.record else "-",
            _fmt_db(s.psnr), f"{ssim(outputs[v.name], ref):.3f}",
            *([setup.task_metric(outputs[v.name], ref)] if setup.task_metric else []),
            f"{peer[0].name} ({peer[0].speed:.2f}x, {_fmt_db(peer[0].psnr)} dB)" if peer else "-",
            verdict(s, *peer) if peer else "-",
        ])  # fmt: skip
    headers = ["variant", "kind", "setting", "sampling s (median, min-max)", "speed-up vs dense (median, min-max)",
               "full steps", "token ratio", "PSNR dB vs dense", "SSIM vs dense",
               *(["classifier accuracy, FD vs test digits"] if setup.task_metric else []),
               "best peer, same run", "verdict (speed at matched quality)"]  # fmt: skip
    accuracy = {v.name: setup.accuracy(outputs[v.name]) for v in rows} if setup.accuracy else {}
    target = target_line(setup.name, scored, accuracy)
    return (markdown_table(headers, table) + f"\n\nMagCache ratios calibrated in this run: {[round(r, 3) for r in mag_ratios]}"
            + (f"\n\n{target}" if target else ""))  # fmt: skip


#: ``--breakdown``: the rows whose whole-run gap issue #28 asks about
BREAKDOWN_ROWS = ("dense", "MagCache", "ToMe + MagCache", FAST_ROW, OLD_FAST_ROW, "token density", "ToMe (tomesd rule)")


def _median_ms(times: list[float]) -> str:
    """``"median (min)"`` in ms; the min is the least disturbed by a shared machine's load."""
    return f"{statistics.median(times) * 1e3:.0f} ({min(times) * 1e3:.0f})" if times else "-"


def _gflops_per_forward(setup: Setup, rows: list[Variant], forwards: list[tuple[float, bool]]) -> dict[str, list[float]]:
    """GFLOPs of each transformer forward of one (untimed) run per row, counted by a
    ``FlopCounterMode`` entered and left by forward hooks on the model (CPU flash attention
    included, as token density counts it). ``forwards`` is the timing hooks' list, cleared after."""
    counters: list[FlopCounterMode] = []
    counts: list[float] = []

    def pre(*_: object) -> None:
        counters.append(_flop_counter())
        counters[-1].__enter__()

    def post(*_: object) -> None:
        counter = counters.pop()
        counter.__exit__(None, None, None)
        counts.append(counter.get_total_flops() / 1e9)

    handles = [setup.model.register_forward_pre_hook(pre), setup.model.register_forward_hook(post)]
    out = {}
    try:
        for v in rows:
            counts.clear()
            v.run()
            out[v.name] = list(counts)
    finally:
        for h in handles:
            h.remove()
        forwards.clear()
    return out


def breakdown(setup: Setup, repeats: int) -> str:
    """Where a whole run's time goes, per row of `BREAKDOWN_ROWS`: every transformer forward timed
    (forward pre/post hooks on the model, around the cache's and token density's own hooks) and
    sorted into *full dense* (the last block ran on every token), *full reduced* (it ran, on fewer
    query tokens) and *skipped* (the cache skipped the blocks). ``repeats`` interleaved rounds,
    order rotated, after one FLOPs-counting run and one warm-up run per row; medians per kind, the
    whole run's sum of forwards, its FLOPs and time ratios against dense side by side, and the PSNR
    of the last round's output against the dense row's."""
    mag_ratios = calibrate_mag_ratios(setup)
    rows = [v for v in variants(setup, mag_ratios) if v.name in BREAKDOWN_ROWS]
    calls, start = {"n": 0}, {"t": 0.0}
    forwards: list[tuple[float, bool]] = []  # (seconds, last block ran) per forward of one run

    def pre(*_: object) -> None:
        calls["n"], start["t"] = 0, time.perf_counter()

    def post(*_: object) -> None:
        forwards.append((time.perf_counter() - start["t"], calls["n"] > 0))

    handles = [setup.model.register_forward_pre_hook(pre), setup.model.register_forward_hook(post),
               setup.blocks[-1].attn1.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))]  # fmt: skip
    kinds: dict[str, dict[str, list[float]]] = {v.name: {"dense": [], "reduced": [], "skipped": [], "run": []} for v in rows}
    full: dict[str, list[int]] = {}
    tokens: dict[str, list[float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    try:
        gflops = _gflops_per_forward(setup, rows, forwards)
        for v in rows:  # warm-up
            v.run()
        for r in range(repeats):
            for v in rows[r % len(rows) :] + rows[: r % len(rows)]:
                forwards.clear()
                outputs[v.name] = v.run()
                step_tokens = v.record.get("step_tokens") or [1.0] * len(forwards)
                if len(step_tokens) != len(forwards):
                    raise RuntimeError(f"{v.name}: {len(forwards)} forwards timed, {len(step_tokens)} recorded")
                full[v.name] = [i for i, (_, ran) in enumerate(forwards) if ran]
                tokens[v.name] = step_tokens
                for (dt, ran), tok in zip(forwards, step_tokens):
                    kinds[v.name]["skipped" if not ran else "dense" if tok == 1.0 else "reduced"].append(dt)
                kinds[v.name]["run"].append(sum(dt for dt, _ in forwards))
    finally:
        for h in handles:
            h.remove()
    table = []
    dense_run, dense_flops = statistics.median(kinds["dense"]["run"]), sum(gflops["dense"])
    for v in rows:
        k = kinds[v.name]
        run = statistics.median(k["run"])
        table.append([
            v.name, f"{len(full[v.name])}/{setup.steps}: steps {', '.join(map(str, full[v.name]))}",
            ", ".join(f"{tokens[v.name][i]:.2f}" for i in full[v.name]),
            ", ".join(f"{g:.1f}" for g in gflops[v.name]), _median_ms(k["dense"]),
            _median_ms(k["reduced"]), _median_ms(k["skipped"]), f"{run:.2f} ({min(k['run']):.2f})",
            f"{dense_flops / sum(gflops[v.name]):.2f}x", f"{dense_run / run:.2f}x",
            _fmt_db(psnr(outputs[v.name], outputs["dense"])),
        ])  # fmt: skip
    headers = ["variant", "forwards that ran the blocks", "token ratio at those forwards", "GFLOPs per forward",
               "ms per full dense forward (median (min))", "ms per full reduced forward", "ms per skipped forward",
               "sum of forwards s (median (min))", "FLOPs ratio vs dense", "time ratio vs dense (medians)",
               "PSNR dB vs dense"]  # fmt: skip
    return markdown_table(headers, table) + f"\n\nMagCache ratios calibrated in this run: {[round(r, 3) for r in mag_ratios]}"


def main(argv: list[str] | None = None) -> str:
    parser = timing_parser(__doc__.splitlines()[0], "tiny widths, 4 steps (a smoke test, seconds)", RESULTS)
    parser.add_argument("--only", choices=tuple(BUILDERS), help="one model only")
    parser.add_argument("--breakdown", action="store_true",
                        help="per-forward times (full dense / full reduced / skipped) of the issue #28 rows instead")  # fmt: skip
    args = parse_timing_args(parser, argv)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    head = (f"### Peers{', per-forward breakdown' if args.breakdown else ''}, {'--quick' if args.quick else 'full'}: random weights, batch 1, fp32, no CFG, "
            f"{args.repeats} interleaved rounds\n\nMachine: {machine_description()}, torch threads "
            f"{torch.get_num_threads()}, load average at start {load} (1 / 5 / 15 min; machine shared)\n")  # fmt: skip
    print(head, flush=True)
    parts = [head]

    def emit(part: str) -> None:  # printed and, with --write, appended as soon as it exists
        print(part, flush=True)
        parts.append(part)
        if args.write:
            with open(RESULTS, "a") as f:
                f.write("\n" + part)

    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write("\n" + head)
    for key, build in BUILDERS.items():
        if args.only and key != args.only:
            continue
        setup = build(args.quick)
        threads = torch.get_num_threads()
        torch.set_num_threads(setup.threads or threads)
        try:
            table = (breakdown if args.breakdown else bench)(setup, args.repeats)
        finally:
            torch.set_num_threads(threads)
        load_now = " / ".join(f"{v:.2f}" for v in os.getloadavg())
        emit(f"#### {setup.name}: {setup.shape}; torch threads {setup.threads or threads}\n\n{table}\n\n"
             f"Load average after this section: {load_now}\n")  # fmt: skip
        del setup
        gc.collect()
    text = "\n".join(parts)
    return text


if __name__ == "__main__":
    main()
