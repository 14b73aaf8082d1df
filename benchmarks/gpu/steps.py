"""GPU benchmark steps of ``benchmarks/gpu/run.sh`` (second version): the papers' shapes at full
depth in bf16, random weights created on the GPU, every variant timed and profiled.

    python benchmarks/gpu/steps.py STEP [STEP ...] --work W [--tiny] [--no-compile]
    python benchmarks/gpu/steps.py report --work W --out OUTDIR [--readiness results/gpu_readiness.json]

Steps, most informative first (``STEPS``):

| step | shape | variants |
|---|---|---|
| svg2 | Wan 2.1 1.3B attention: 12 heads x 128, S = 32,760 (480p, 81 frames) | cuDNN/default SDPA, flash SDPA, SVG2 attention, SVG2 step (warm k-means) |
| wan14b | one Wan-14B attention layer at 720p: 40 heads x 128, S = 75,600 | SDPA, SVG2 preset `wan2.1-14b-720p` (top-p 0.9), tile-sized clusters (297 / 600) |
| density | DiT-XL/2 512 px, batch 16, t = 500 | dense, token density, FlexDiT, DyDiT; eager and regionally compiled |
| wan | one Wan 2.1 1.3B transformer forward, 480p x 81 frames (32,760 tokens) | dense, SVG2 preset `wan2.1-1.3b-480p`, tile-sized clusters (128 / 260), every layer sparse; eager and compiled |
| hired | LLaVA-NeXT-7B (32 LM x 4096, 24 CLIP x 1024), 672 px = 5 partitions, batch 1 and 8 | TTFT dense vs HiRED 20% |
| pixart | PixArt-Sigma-shaped (28 x 1152) at 2048 px: 16,384 tokens | dense, token density; eager and compiled |
| nar | LlamaGen GPT-L (24 x 1024), 24 x 24 tokens, batch 1 and 16, KV cache | PAR-4X, NAR |
| clip | Wan 2.1 1.3B, 21 latent frames of 60 x 104 | per-GPU peak memory at N = 1, 2, 4, 8 (bracketed on one GPU) |

Each timing: CUDA events, a warm-up per variant, >= 10 interleaved rounds (order rotated), median
with min-max (``profiling.time_variants``). Each variant is then profiled once
(``profiling.profile_call``: top kernels, GPU-busy fraction, main kernel vs the rest, host-device
syncs) and given a prediction: its FLOPs (``FlopCounterMode``, or the attention formula where the
kernel is a compiled flex kernel) and bytes, the floor time on an H100/H200 and the expected ratio
over the baseline. Compiled variants use regional compilation (``compile_repeated_blocks`` or per
block). ``nvidia-smi``'s clocks, temperature and other processes are recorded before and after
each step. Each step writes ``W/<step>.json`` after every stage (a step killed at its cap keeps
what it measured) and starts no stage past ``--budget-s``. ``--tiny`` runs the same code on
CPU-sized shapes in fp32 (the dry run; compiled variants with the ``eager`` backend).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profiling as P  # noqa: E402  (a sibling file: run.sh runs this file by path)

STEPS = ("env", "svg2", "wan14b", "density", "wan", "hired", "pixart", "nar", "clip")
PAPER = {
    "svg2": ("SVG2: 1.89x end to end on Wan 2.1 (the attention-only speed-up should be well above it)", 1.89),
    "wan14b": ("SVG2 on Wan 2.1 14B 720p: 1.89x end to end (attention dominates at 75,600 tokens)", 1.89),
    "density": ("FlexDiT: 2.75x faster than DiT-XL/2 at 512 px (token density: lower, see its docs)", 2.75),
    "wan": ("SVG2: 1.89x end to end on Wan 2.1 (here one transformer forward, every layer sparse)", 1.89),
    "hired": ("HiRED 20% budget: 4.6x TTFT (LLaVA-NeXT-7B, Tesla P40)", 4.6),
    "pixart": ("token reduction at 2048 px: ToDo 4.5x, tomesd 1.65x (GPU_FACTS.md)", 1.65),
    "nar": ("NAR: 2.4x images/s over PAR-4X at 24x24 (LlamaGen GPT-L, KV cache)", 2.4),
    "clip": ("Video-Infinity: per-GPU memory ~ 1/N of the video's activations", None),
}


class Step:
    """One step's record: settings, figures, profiles and table rows, written after every stage."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args, self.t0 = name, args, time.perf_counter()
        paper = PAPER.get(name, (None, None))
        self.data: dict[str, Any] = {"step": name, "status": "running", "tiny": args.tiny, "settings": {},
                                     "figures": {}, "headers": [], "rows": [], "notes": [], "paper": paper[0],
                                     "paper_ratio": paper[1], "gpu_before": P.gpu_state(), "profiles": {}}  # fmt: skip
        self.path = Path(args.work) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def stage(self, what: str, need_s: float) -> bool:
        """True when ``need_s`` seconds are left for ``what``; else records the skip."""
        if self.left() >= need_s:
            print(f"[{self.name}] {what} ({self.left():.0f} s left)", flush=True)
            return True
        self.data["notes"].append(f"skipped {what}: {self.left():.0f} s left of --budget-s, needs ~{need_s:.0f} s")
        self.save()
        return False

    def row(self, *cells: Any) -> None:
        self.data["rows"].append([_plain(c) for c in cells])
        self.save()

    def save(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
            self.data["gpu_after"] = P.gpu_state()
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def _plain(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else str(x)
    return x


def _setup(args: argparse.Namespace):
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.gpu = "H200" if device == "cuda" and "H200" in torch.cuda.get_device_name() else "H100"
    return torch, device, dtype


def count_flops(fn: Callable[[], object]) -> float | None:
    """FLOPs of one eager call (``torch.utils.flop_counter``); None where an op refuses the mode
    (a compiled higher-order op such as flex_attention): the table then shows no floor."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
    except Exception as exc:  # noqa: BLE001  (reported: the floor cell stays empty, the reason is printed)
        print(f"count_flops: no count ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        return None
    return float(counter.get_total_flops())


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, density: float = 1.0) -> float:
    """QK^T and PV of attention at ``density`` of the (query, key) pairs."""
    return 4.0 * b * h * sq * sk * d * density


def measure(
    s: Step,
    fns: dict[str, Callable[[], object]],
    device: str,
    *,
    label: str = "",
    main: dict[str, str] | None = None,
    flops: dict[str, float | None] | None = None,
    nbytes: float | dict[str, float] = 0.0,
    rounds: int | None = None,
    per_call: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Time ``fns`` (the first is the baseline), profile each, predict each from its FLOPs and
    ``nbytes`` (bytes it must read: one number, or one per variant); one table row and one figure
    per variant. ``per_call``: items per call (images). ``rounds``: 10 (3 in --tiny, the dry run)."""
    timing = P.time_variants(fns, device, rounds=rounds or (3 if s.args.tiny else 10))
    floors = {}
    for name, fn in fns.items():
        f = (flops or {}).get(name)
        f = count_flops(fn) if f is None and name not in (flops or {}) else f
        b = nbytes[name] if isinstance(nbytes, dict) else nbytes
        floors[name] = None if f is None and not b else P.floor_s(f or 0.0, b, s.args.gpu)
        prof = P.profile_call(fn, device, (main or {}).get(name)) if s.left() > 5 else None
        key = f"{name}{label}"
        s.data["profiles"][key] = prof
        t = timing[name]
        base_floor = floors[next(iter(fns))]
        expected = base_floor / floors[name] if base_floor and floors[name] else None
        s.data["figures"][key] = {**{k: v for k, v in t.items() if k != "times_s"}, "times_s": t["times_s"],
                                  "flops": f, "floor_s": floors[name], "expected_ratio": expected,
                                  "per_s": per_call / t["median_s"]}  # fmt: skip
        busy = None if not prof or "busy_fraction" not in prof else f"{100 * prof['busy_fraction']:.0f}%"
        mk = (prof or {}).get("main_kernel")
        syncs = (prof or {}).get("syncs", {})
        s.row(key, f"{1e3 * t['median_s']:.3g} ms ({1e3 * t['min_s']:.3g}-{1e3 * t['max_s']:.3g})",
              f"{t['ratio']:.2f}x ({t['ratio_min']:.2f}-{t['ratio_max']:.2f})",
              None if floors[name] is None else f"{1e3 * floors[name]:.3g} ms",
              None if expected is None else f"{expected:.2f}x", busy,
              None if not mk else f"{mk['ms']:.3g} / {mk['rest_ms']:.3g} ms",
              syncs.get("sync_calls", syncs.get("counted")))  # fmt: skip
    return timing


HEADERS = ["variant", "time median (min-max)", "speed-up vs first (min-max)", "floor (FLOPs, bytes)",
           "expected speed-up", "GPU busy", "main kernels / rest (device ms)", "syncs"]  # fmt: skip


def _headline(s: Step, figure: str, key: str) -> None:
    f = s.data["figures"][key]
    s.data["figures"]["headline"] = {"figure": figure, "value": f["ratio"], "min": f["ratio_min"],
                                     "max": f["ratio_max"], "paper": s.data["paper_ratio"],
                                     "expected": f.get("expected_ratio")}  # fmt: skip
    s.save()


def _compiled(s: Step, what: str, models: dict[str, Any], backend: str) -> dict[str, Any] | None:
    """Regionally compiled copies of ``models`` (each compile capped at 60 s by the step's budget);
    None, with the error in the notes, where compiling fails."""
    out = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        try:
            how = P.regional_compile(m, backend=backend)
        except Exception as exc:  # recorded, not hidden: the eager figures stand
            s.data["notes"].append(f"{what}: compiling {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
            s.save()
            return None
        s.data["settings"].setdefault("compile", {})[name] = f"{how}, {backend}"
        out[name] = m
        s.data["settings"]["compile"][name] += f", set up in {time.perf_counter() - t0:.1f} s"
    return out


# ------------------------------------------------------------------------------------------ env
def step_env(args: argparse.Namespace) -> None:
    """Every requirement of mmaccel and diffusers met by what is installed; versions and device."""
    from importlib import metadata

    from packaging.requirements import Requirement

    s = Step("env", args)
    problems, versions = [], {}
    for root in ("mmaccel", "diffusers"):
        dist = metadata.distribution(root)
        versions[root] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{root} needs {req}: not installed")
                continue
            versions[req.name] = have
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{root} needs {req}: {have} installed")
    import torch

    import mmaccel

    s.data["settings"] = {"python": sys.version.split()[0], "mmaccel_from": os.path.dirname(mmaccel.__file__),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                          "cuda": torch.cuda.is_available(),
                          "gpus": torch.cuda.device_count(),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
    s.data["figures"] = {"versions": versions, "problems": problems}
    s.data["notes"] += problems
    for p in problems:
        print(f"[env] {p}", flush=True)
    s.save("ok" if not problems else "failed")
    if problems:
        sys.exit(1)


# ------------------------------------------------------------------------------ svg2 / wan14b
def _clustered_qkv(torch, b: int, h: int, s: int, d: int, groups: int, device: str, dtype, seed: int = 0):
    """q/k/v whose tokens belong to ``groups`` semantic groups (as video objects do): attention
    concentrates within a group, so a top-p cluster selection reaches video-like densities."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centers = torch.randn(h, groups, d, generator=g)
    label = torch.randint(0, groups, (h, s), generator=g)
    base = torch.gather(centers, 1, label[..., None].expand(h, s, d)) * 1.5
    out = []
    for scale in (1.0, 1.0, 0.0):  # q and k around the group centres; v plain noise
        x = torch.randn(b, h, s, d, generator=g) * (0.6 if scale else 1.0) + base * scale
        out.append(x.to(device, dtype))
    return out


SDPA_KERNEL = "flash|fmha|cudnn|attention|sdpa"
FLEX_KERNEL = "triton_tem|flex"
# a whole model's useful work: matmuls and attention on the tensor cores (the rest: elementwise ops,
# norms, gathers, copies, k-means, mask building)
MATMUL_KERNELS = "gemm|gemv|xmma|cutlass|nvjet|cublas|flash|fmha|cudnn|attention|triton_tem"


def _attention_step(args: argparse.Namespace, name: str, shape: tuple[int, int, int, int], preset: str,
                    groups: int) -> None:  # fmt: skip
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmaccel.sparse_attn import (
        SparseAttentionState,
        SVG2Config,
        cluster_sparse_attention,
        semantic_sparse_attention,
    )

    torch, device, dtype = _setup(args)
    s = Step(name, args)
    F = torch.nn.functional
    b, h, seq, d = shape
    backend = "auto" if args.tiny else "flex"
    q, k, v = _clustered_qkv(torch, b, h, seq, d, groups, device, dtype)
    # the authors' settings at this model and resolution, with cluster counts sized to the kernel's
    # 128 x 64 tiles (SVG2Config.preset(tile_sized=True): padding <= ~25%); every step sparse here
    config = SVG2Config.preset(preset, tile_sized=not args.tiny, backend=backend, dense_steps=0.0, dense_layers=0.0)
    if args.tiny:
        config = replace(config, num_q_clusters=8, num_k_clusters=16, kmeans_init_iters=5)
    qc, kc = config.num_q_clusters, config.num_k_clusters
    s.data["settings"] = {"B": b, "H": h, "S": seq, "D": d, "preset": preset, "q_clusters": qc, "k_clusters": kc,
                          "top_p": config.top_p, "min_kc_ratio": config.min_kc_ratio, "dtype": str(dtype),
                          "device": device, "backend": backend, "tiles": [config.q_block_size, config.kv_block_size],
                          "layout": config.layout, "groups": groups}  # fmt: skip
    s.data["notes"].append(f"Synthetic q/k in {groups} semantic groups per head (attention concentrates in a group, "
                           "as in video); reference top-p 0.9. 'SVG2 attention' = cluster selection + the sparse "
                           "kernel on fixed clusters; 'SVG2 step' adds the warm k-means (2 iterations), as every "
                           "sparse step after the first runs it.")  # fmt: skip
    s.data["headers"] = HEADERS
    if not s.stage("cold k-means and selection", 10):
        return s.save("skipped")
    state = SparseAttentionState()
    with torch.no_grad():
        semantic_sparse_attention(q, k, v, config, state)
    density = float(state.density)
    ql, kl = state.q_labels.reshape(b, h, seq), state.k_labels.reshape(b, h, seq)
    s.data["settings"].update(density=density, kernel=state.backend)
    s.save()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v)

    def with_backend(kind):
        def run():
            with sdpa_kernel([kind]):
                F.scaled_dot_product_attention(q, k, v)

        return run

    fns: dict[str, Callable[[], object]] = {"SDPA (default)": sdpa}
    if device == "cuda":
        for label, kind in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
            try:  # a backend that refuses these shapes/dtype is named in the notes, not timed
                with torch.no_grad():
                    with_backend(kind)()
                fns[label] = with_backend(kind)
            except RuntimeError as exc:
                s.data["notes"].append(f"{label} not available here: {str(exc)[:200]}")
    fns["SVG2 attention"] = lambda: cluster_sparse_attention(q, k, v, ql, kl, config)
    fns["SVG2 step"] = lambda: semantic_sparse_attention(q, k, v, config, state)
    dense_f = attention_flops(b, h, seq, seq, d)
    kmeans_f = 2 * config.kmeans_iters * 2.0 * b * h * seq * (qc + kc) * d  # distances of q and k, 2 iterations
    flops = {n: dense_f for n in fns if n.startswith("SDPA")}
    flops["SVG2 attention"] = dense_f * density
    flops["SVG2 step"] = dense_f * density + kmeans_f
    main = {n: SDPA_KERNEL for n in fns} | {"SVG2 attention": FLEX_KERNEL, "SVG2 step": FLEX_KERNEL}
    if not s.stage("SDPA / SVG2 timing and profiles", 15):
        return s.save("partial")
    with torch.no_grad():
        measure(s, fns, device, main=main, flops=flops, nbytes=4 * b * h * seq * d * q.element_size())
    _headline(s, f"SVG2 attention at density {density:.3f} vs SDPA, S={seq}", "SVG2 attention")
    s.save("ok")


def step_svg2(args: argparse.Namespace) -> None:
    # Wan 2.1 1.3B: 12 heads x 128; 81 frames at 480 x 832 -> 21 x 30 x 52 = 32,760 video tokens
    tiny = args.tiny
    _attention_step(args, "svg2", (1, 1, 384, 16) if tiny else (1, 12, 32760, 128), "wan2.1-1.3b-480p",
                    12 if tiny else 96)  # fmt: skip


def step_wan14b(args: argparse.Namespace) -> None:
    # Wan 2.1 14B at 720p: 40 heads x 128, 21 x 45 x 80 = 75,600 tokens
    tiny = args.tiny
    _attention_step(args, "wan14b", (1, 2, 512, 16) if tiny else (1, 40, 75600, 128), "wan2.1-14b-720p",
                    12 if tiny else 96)  # fmt: skip


# ------------------------------------------------------------------------------------- density
def _dit_xl(tiny: bool, device: str, dtype, sample_size: int = 64):
    from diffusers import DiTTransformer2DModel

    cfg = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=sample_size)  # DiT-XL/2
    if tiny:
        cfg = dict(num_attention_heads=2, attention_head_dim=16, num_layers=6, sample_size=16)
    return P.on_device(lambda: DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, attention_bias=True,
                                                     activation_fn="gelu-approximate", norm_type="ada_norm_zero",
                                                     num_embeds_ada_norm=1000, norm_elementwise_affine=False, **cfg),
                       device, dtype)  # fmt: skip


def _params_bytes(model) -> float:
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def _eager_and_compiled(s: Step, args, device: str, build: Callable[[], dict[str, Any]], call: Callable, *,
                        label_main: dict[str, str] | None = None, nbytes: float, per_call: float,
                        headline: tuple[str, str]) -> None:  # fmt: skip
    """Time the models ``build()`` returns eagerly, then regionally compiled copies of them."""
    import torch

    models = build()
    s.data["headers"] = HEADERS
    if not s.stage("eager", 20):
        return s.save("skipped")
    with torch.no_grad():
        measure(s, {n: call(m) for n, m in models.items()}, device, label=" (eager)", main=label_main,
                nbytes=nbytes, per_call=per_call)  # fmt: skip
    _headline(s, f"{headline[0]} (eager)", f"{headline[1]} (eager)")
    if not args.compile or not s.stage("compiled (regional)", 40):
        if not args.compile:
            s.data["notes"].append("compiled variants not run (--no-compile)")
        return s.save("ok")
    compiled = _compiled(s, "compiled", {n: copy.deepcopy(m) for n, m in models.items()}, args.compile_backend)
    if compiled is None:
        return s.save("ok")
    for name, m in compiled.items():  # the first call compiles (lazily): time it, it must stay under 60 s
        t0 = time.perf_counter()
        with torch.no_grad():
            call(m)()
        seconds = time.perf_counter() - t0
        s.data["settings"]["compile"][name] += f", first call (compiles) {seconds:.1f} s"
        if seconds > 60:
            s.data["notes"].append(f"compiling {name} took {seconds:.0f} s, over the 60 s a regional compile may take")
        s.save()
    flops = {n: s.data["figures"][f"{n} (eager)"]["flops"] for n in compiled}  # the same arithmetic as eager
    with torch.no_grad():
        measure(s, {n: call(m) for n, m in compiled.items()}, device, label=" (compiled)", main=label_main,
                flops=flops, nbytes=nbytes, per_call=per_call)  # fmt: skip
    s.save("ok")


def step_density(args: argparse.Namespace) -> None:
    from mmaccel.diffusion import (
        DyDiTConfig,
        FlexDiTConfig,
        TokenDensityConfig,
        apply_token_density,
        convert_to_dydit,
        convert_to_flexdit,
    )

    torch, device, dtype = _setup(args)
    s = Step("density", args)
    model = _dit_xl(args.tiny, device, dtype)
    batch, size = (2 if args.tiny else 16), model.config.sample_size
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, 4, size, size, generator=g).to(device, dtype),
                  timestep=torch.full((batch,), 500, device=device),
                  class_labels=torch.randint(0, 1000, (batch,), generator=g).to(device))  # fmt: skip
    s.data["settings"] = {"model": "DiT-XL/2 (28 x 1152, random weights)" if not args.tiny else "tiny 6-block DiT",
                          "latent": size, "tokens": (size // 2) ** 2, "batch": batch, "timestep": 500,
                          "dtype": str(dtype)}  # fmt: skip
    s.data["notes"].append("One transformer forward at t=500 (token density reduces there by default). FlexDiT = "
                           "convert_to_flexdit with the paper's layout; DyDiT = convert_to_dydit with the reference "
                           "config: untrained routers start with every group and token on (router bias 15 / 35), "
                           "so it shows the routers' overhead, not a saving. Random weights: speed only.")  # fmt: skip
    layout = FlexDiTConfig()
    if args.tiny:
        layout = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=1,
                               sparse_grid=(4, 4))  # fmt: skip

    def build() -> dict[str, Any]:
        reduced = copy.deepcopy(model)
        handle = apply_token_density(reduced, TokenDensityConfig())
        s.data["settings"]["token_density_handle"] = type(handle).__name__
        return {"dense": model, "token density": reduced,
                "FlexDiT": convert_to_flexdit(copy.deepcopy(model), layout).to(device, dtype).eval(),
                "DyDiT": convert_to_dydit(copy.deepcopy(model), DyDiTConfig()).to(device, dtype).eval()}  # fmt: skip

    _eager_and_compiled(s, args, device, build, lambda m: lambda: m(**inputs), nbytes=_params_bytes(model),
                        per_call=batch, headline=("FlexDiT forward speed-up", "FlexDiT"),
                        label_main=dict.fromkeys(("dense", "token density", "FlexDiT", "DyDiT"), MATMUL_KERNELS))  # fmt: skip


# ------------------------------------------------------------------------------------------ wan
WAN_13B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)


def _wan(tiny: bool, device: str, dtype, layers: int | None = None):
    from diffusers import WanTransformer3DModel

    cfg = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2) if tiny else dict(WAN_13B)
    if layers:
        cfg["num_layers"] = layers
    return P.on_device(lambda: WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16,
                                                     text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                                     qk_norm="rms_norm_across_heads", eps=1e-6, **cfg),
                       device, dtype)  # fmt: skip


def step_wan(args: argparse.Namespace) -> None:
    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    torch, device, dtype = _setup(args)
    s = Step("wan", args)
    frames, hw = ((3, (8, 12)) if args.tiny else (21, (60, 104)))
    model = _wan(args.tiny, device, dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, frames, *hw, generator=g).to(device, dtype)
    text = torch.randn(1, 8 if args.tiny else 512, 4096, generator=g).to(device, dtype)
    tokens = frames * hw[0] * hw[1] // 4
    config = SVG2Config.preset("wan2.1-1.3b-480p", tile_sized=not args.tiny, dense_steps=0.0, dense_layers=0.0,
                               backend="auto" if args.tiny else "flex")  # fmt: skip
    if args.tiny:
        config = replace(config, num_q_clusters=4, num_k_clusters=8, kmeans_init_iters=5)
    qc, kc = config.num_q_clusters, config.num_k_clusters
    s.data["settings"] = {"model": "Wan 2.1 1.3B transformer (30 x 1536)" if not args.tiny else "tiny Wan",
                          "latent": [frames, *hw], "tokens": tokens, "text_tokens": text.shape[1], "dtype": str(dtype),
                          "svg2": {"q_clusters": qc, "k_clusters": kc, "top_p": 0.9, "every_layer_sparse": True}}  # fmt: skip
    s.data["notes"].append("One transformer forward at t=500; SVG2 warm (the first call's cold k-means runs in "
                           "the warm-up), every layer and step sparse (dense_steps = dense_layers = 0).")  # fmt: skip

    def build() -> dict[str, Any]:
        sparse = copy.deepcopy(model)
        apply_svg2(sparse, config)
        return {"dense": model, "SVG2": sparse}

    def call(m):
        return lambda: m(latents, torch.tensor([500.0], device=device), text, return_dict=False)

    main = {"dense": MATMUL_KERNELS, "SVG2": MATMUL_KERNELS}
    _eager_and_compiled(s, args, device, build, call, label_main=main, nbytes=_params_bytes(model), per_call=1,
                        headline=("SVG2 Wan 1.3B forward speed-up", "SVG2"))  # fmt: skip


# ---------------------------------------------------------------------------------------- hired
HIRED_SHAPES = {
    # LLaVA-NeXT-7B at full depth: CLIP ViT-L/14-336 (24 x 1024) + Vicuna-7B (32 x 4096, ffn 11008)
    "real": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                 text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
                 image_size=336, batches=(1, 8)),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
                 image_size=56, batches=(1, 2)),
}  # fmt: skip


def _llava_next(torch, shape: dict, device: str, dtype):
    import transformers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    from mmaccel.testing import tiny_tokenizer

    tok = tiny_tokenizer("llama")
    tok.model_max_length = 16384
    b = shape["image_size"]
    pinpoints = [[b, 2 * b], [2 * b, b], [2 * b, 2 * b], [3 * b, b], [b, 3 * b]]
    vision = CLIPVisionConfig(image_size=b, patch_size=14, projection_dim=32, **shape["vision"])
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, max_position_embeddings=16384, **shape["text"])  # fmt: skip
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=(b // 14) ** 2,
                             tie_word_embeddings=False)  # fmt: skip
    model = P.on_device(lambda: LlavaNextForConditionalGeneration(config), device, dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    processor = LlavaNextProcessor(
        image_processor=image_cls(size={"shortest_edge": b}, crop_size={"height": b, "width": b},
                                  image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )  # fmt: skip
    return model, processor


def _sharing_copy(model):
    """A copy of ``model`` whose parameters and buffers are the original's tensors (no memory)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def step_hired(args: argparse.Namespace) -> None:
    from mmaccel.runtime.budget import TokenBudget
    from mmaccel.testing import tiny_image
    from mmaccel.vlm import HiREDConfig, apply_hired

    torch, device, dtype = _setup(args)
    s = Step("hired", args)
    shape = HIRED_SHAPES["tiny" if args.tiny else "real"]
    model, processor = _llava_next(torch, shape, device, dtype)
    tech = _sharing_copy(model)  # same weights, patched for the whole step
    handle = apply_hired(tech, HiREDConfig(budget=TokenBudget(ratio=0.2)))
    b = shape["image_size"]
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    s.data["settings"] = {"shape": shape, "dtype": str(dtype), "device": device, "image_px": 2 * b, "partitions": 5,
                          "vision_params_M": params(model.model.vision_tower) / 1e6,
                          "lm_params_M": params(model.model.language_model) / 1e6, "compile": False}  # fmt: skip
    s.data["notes"].append("TTFT = generate(max_new_tokens=1): vision tower, HiRED scoring/selection, LM prefill, "
                           "first token; eager (generate's shapes change per budget). LLaVA-NeXT-7B at full depth, "
                           "random weights created on the device.")  # fmt: skip
    s.data["headers"] = HEADERS
    prompt = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
    for batch in shape["batches"]:
        if not s.stage(f"batch {batch}: dense vs HiRED 20% TTFT", 15):
            break
        images = [tiny_image(2 * b, 2 * b, seed=i) for i in range(batch)]
        inputs = processor(images=images, text=[prompt] * batch, return_tensors="pt", padding=True)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        s.data["settings"][f"seq_len_batch{batch}"] = inputs["input_ids"].shape[1]

        def ttft(m):
            def run():
                with torch.inference_mode():
                    m.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)  # noqa: B023

            return run

        def prefill_flops(m):
            return count_flops(lambda: m(**inputs, logits_to_keep=1))  # noqa: B023

        flops = {"dense": prefill_flops(model), "HiRED 20%": prefill_flops(tech)}  # the prefill; + 1 token's worth
        handle.stats.reset()
        measure(s, {"dense": ttft(model), "HiRED 20%": ttft(tech)}, device, label=f" (batch {batch})", flops=flops,
                nbytes=_params_bytes(model), per_call=batch, main=dict.fromkeys(("dense", "HiRED 20%"), MATMUL_KERNELS))  # fmt: skip
        s.data["figures"][f"HiRED stats (batch {batch})"] = handle.stats.summary()
        _headline(s, "HiRED 20% TTFT speed-up (batch 1)", "HiRED 20% (batch 1)")
    s.save("ok" if s.data["figures"].get("headline") else "partial")


# --------------------------------------------------------------------------------------- pixart
def step_pixart(args: argparse.Namespace) -> None:
    from diffusers import PixArtTransformer2DModel

    from mmaccel.diffusion import TokenDensityConfig, apply_token_density

    torch, device, dtype = _setup(args)
    s = Step("pixart", args)
    if args.tiny:
        cfg, size, text_len = dict(num_attention_heads=2, attention_head_dim=16, num_layers=3, sample_size=16,
                                   cross_attention_dim=32, caption_channels=32), 16, 8  # fmt: skip
    else:  # PixArt-Sigma XL/2 at 2048 px: 28 x 1152, latent 256 x 256 -> 128 x 128 = 16,384 tokens
        cfg, size, text_len = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=256,
                                   cross_attention_dim=1152, caption_channels=4096), 256, 300  # fmt: skip
    model = P.on_device(lambda: PixArtTransformer2DModel(in_channels=4, out_channels=8, patch_size=2,
                                                         norm_type="ada_norm_single", interpolation_scale=4,
                                                         use_additional_conditions=False, **cfg), device, dtype)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, size, size, generator=g).to(device, dtype),
                  encoder_hidden_states=torch.randn(1, text_len, cfg["caption_channels"], generator=g).to(device, dtype),
                  timestep=torch.tensor([500], device=device), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  return_dict=False)  # fmt: skip
    s.data["settings"] = {"model": "PixArt-Sigma-shaped (28 x 1152)" if not args.tiny else "tiny PixArt",
                          "tokens": (size // 2) ** 2, "batch": 1, "timestep": 500, "dtype": str(dtype)}  # fmt: skip

    def build() -> dict[str, Any]:
        reduced = copy.deepcopy(model)
        apply_token_density(reduced, TokenDensityConfig())
        return {"dense": model, "token density": reduced}

    _eager_and_compiled(s, args, device, build, lambda m: lambda: m(**inputs), nbytes=_params_bytes(model),
                        per_call=1, headline=("token density at 2048 px", "token density"),
                        label_main=dict.fromkeys(("dense", "token density"), MATMUL_KERNELS))  # fmt: skip


# ------------------------------------------------------------------------------------------ nar
def step_nar(args: argparse.Namespace) -> None:
    from mmaccel.tokenizers_img import GPT, GPTConfig, SamplingConfig, decode, nar_schedule, par_schedule

    torch, device, dtype = _setup(args)
    s = Step("nar", args)
    if args.tiny:
        cfg, grid, batches = GPTConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, num_classes=10), 4, (1, 2)
    else:  # LlamaGen GPT-L (24 x 1024, 16 heads), 384 px = 24 x 24 tokens, NAR head
        cfg, grid, batches = GPTConfig(vocab_size=16384, dim=1024, n_layer=24, n_head=16), 24, (1, 16)
    model = P.on_device(lambda: GPT(cfg), device, dtype)
    sampling = SamplingConfig(top_k=2000 if not args.tiny else 0)
    s.data["settings"] = {"model": f"GPT {cfg.n_layer} x {cfg.dim}", "grid": grid, "batches": batches,
                          "dtype": str(dtype), "kv_cache": True, "sampling": "top_k 2000, no CFG"}  # fmt: skip
    s.data["notes"].append("Random-weight LlamaGen GPT-L with the NAR head; both orders decode the same grid with "
                           "the KV cache. PAR-4X = par_schedule(h, w, 2). Rounds are cut below 10 where the "
                           "warm-up says 10 would not fit the step's cap (the count is in the figure).")  # fmt: skip
    s.data["headers"] = HEADERS
    for batch in batches:
        cond = torch.arange(batch, device=device) % cfg.num_classes
        fns, reads = {}, {}
        for name, schedule in (("PAR-4X", par_schedule(grid, grid, 2)), ("NAR", nar_schedule(grid, grid))):
            reads[name] = schedule.forward_passes * _params_bytes(model)  # each forward reads the weights
            fns[name] = (lambda sch: lambda: decode(model, cond, sch, sampling, use_cache=True,  # noqa: B023
                                                    generator=torch.Generator(device).manual_seed(0)))(schedule)  # fmt: skip
        if not s.stage(f"batch {batch}: warm-up", 10):
            break
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        one_round = time.perf_counter() - t0
        rounds = 3 if args.tiny else max(3, min(10, int(0.6 * s.left() / max(one_round, 1e-6)) - 2))
        s.data["settings"][f"rounds_batch{batch}"] = rounds
        if not s.stage(f"batch {batch}: {rounds} rounds", 1.3 * one_round * (rounds + 2)):
            break
        with torch.inference_mode():
            fed = 2.0 * sum(p.numel() for p in model.parameters()) * grid * grid * batch  # each token fed once
            measure(s, fns, device, label=f" (batch {batch})", flops=dict.fromkeys(fns, fed), nbytes=reads,
                    rounds=rounds, per_call=batch, main=dict.fromkeys(fns, MATMUL_KERNELS))  # fmt: skip
    key = "NAR (batch 16)" if "NAR (batch 16)" in s.data["figures"] else "NAR (batch 1)"
    if key in s.data["figures"]:
        _headline(s, f"NAR images/s over PAR-4X, {grid}x{grid}, {key[5:-1]}", key)
    s.save("ok" if "headline" in s.data["figures"] else "partial")


# ----------------------------------------------------------------------------------------- clip
def step_clip(args: argparse.Namespace) -> None:
    from mmaccel.parallel_video import ClipParallelConfig, apply_clip_parallel
    from mmaccel.runtime.distributed import init_distributed

    torch, device, dtype = _setup(args)
    s = Step("clip", args)
    frames, hw = (9, (8, 12)) if args.tiny else (21, (60, 104))
    model = _wan(args.tiny, device, dtype)
    text = torch.randn(1, 8 if args.tiny else 512, 4096, device=device, dtype=dtype)
    config = ClipParallelConfig()
    s.data["settings"] = {"model": "Wan 2.1 1.3B (30 x 1536)" if not args.tiny else "tiny Wan", "latent_frames": frames,
                          "latent_hw": hw, "dtype": str(dtype), "padding": config.padding,
                          "global_frames": config.global_frames}  # fmt: skip
    s.data["notes"].append("Per-GPU memory at N GPUs, bracketed on one GPU: peak of one forward on the rank's own "
                           "clip frames (lower bound) and on all frames it holds (clip, halos, global frames: upper "
                           "bound), weights included.")  # fmt: skip
    s.data["headers"] = ["GPUs", "latent frames / rank", "peak MiB / GPU (own-held)", "time s (held)",
                         "held vs 1 GPU memory"]  # fmt: skip

    def forward(n_frames: int):
        lat = torch.randn(1, 16, n_frames, *hw, device=device, dtype=dtype)
        with torch.no_grad():
            model(lat, torch.tensor([500.0], device=device), text, return_dict=False)

    def peak(fn) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan"),
                time.perf_counter() - t)  # fmt: skip

    if not s.stage("full video: plain and apply_clip_parallel at world size 1", 10):
        return s.save("skipped")
    forward(frames)
    base_mib, base_s = peak(lambda: forward(frames))
    with apply_clip_parallel(model, config, ctx=init_distributed(), num_latent_frames=frames):
        forward(frames)
        clip_mib, clip_s = peak(lambda: forward(frames))
    s.row("1 (plain)", frames, base_mib, base_s, 1.0)
    s.row("1 (apply_clip_parallel)", frames, clip_mib, clip_s, clip_mib / base_mib if base_mib == base_mib else None)
    s.data["figures"]["world1"] = {"plain_mib": base_mib, "clip_parallel_mib": clip_mib}
    for n in (2,) if args.tiny else (2, 4, 8):
        if not s.stage(f"{n} GPUs: one rank's frames", 5):
            break
        plan = config.plan(frames, n)
        own = max(end - start for start, end in plan.clips)
        held = min(frames, max(plan.window(r)[1] - plan.window(r)[0] + len(plan.global_indices) for r in range(n)))
        low, _ = peak(lambda: forward(own))  # noqa: B023
        mib, sec = peak(lambda: forward(held))  # noqa: B023
        s.row(n, f"{own} own / {held} held", f"{low:.0f}-{mib:.0f}", sec, mib / base_mib if base_mib == base_mib else None)
        s.data["figures"][f"world{n}"] = {"frames_own": own, "frames_held": held, "peak_mib_own": low, "peak_mib_held": mib}
    s.save("ok")


STEP_FNS: dict[str, Callable[[argparse.Namespace], None]] = {
    "env": step_env, "svg2": step_svg2, "wan14b": step_wan14b, "density": step_density, "wan": step_wan,
    "hired": step_hired, "pixart": step_pixart, "nar": step_nar, "clip": step_clip,
}  # fmt: skip


# --------------------------------------------------------------------------------------- report
def _readiness(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    return {r["technique"]: r for r in json.loads(path.read_text())["rows"]}


TECHNIQUE_OF = {"svg2": "SVG2 attention", "wan14b": "SVG2 attention, Wan-14B layer",
                "density": "FlexDiT, token density, DyDiT", "wan": "SVG2 in a Wan 1.3B forward", "hired": "HiRED",
                "pixart": "token density at 2048 px", "nar": "NAR", "clip": "clip parallelism"}  # fmt: skip
READINESS_OF = {"svg2": "SVG2", "wan14b": "SVG2", "density": "token density", "wan": "SVG2", "hired": "HiRED",
                "pixart": "token density", "nar": "NAR", "clip": "clip parallelism"}  # fmt: skip


def _prediction(d: dict, readiness: dict[str, dict], step: str) -> str:
    head = d.get("figures", {}).get("headline") or {}
    parts = []
    if head.get("expected"):
        parts.append(f"FLOP/byte floor {head['expected']:.2f}x")
    r = readiness.get(READINESS_OF.get(step, ""))
    if r:
        breaks = "–" if r.get("graph_breaks") is None else r["graph_breaks"]
        parts.append(f"{r['technique']}: {r['syncs']:.3g} syncs/forward, ops {r['ops_ratio']:.2f}x dense, "
                     f"{breaks} breaks")  # fmt: skip
    return "; ".join(parts) or "–"


def summary_table(steps: dict[str, dict], readiness: dict[str, dict]) -> list[str]:
    """RESULTS.md's GPU table: one row per step, the CPU prediction beside the measured figure."""
    lines = ["| technique (step) | setting | measured | CPU prediction | target (paper) | verdict |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in STEPS[1:]:
        d = steps[name]
        head = d.get("figures", {}).get("headline")
        plain = [(k, v) for k, v in d.get("settings", {}).items() if isinstance(v, (int, float, str))]
        settings = ", ".join(f"{k} {v}" for k, v in plain[:6])
        if head:
            measured = f"{head['value']:.2f}x ({head['min']:.2f}-{head['max']:.2f})"
            verdict = "met" if head.get("paper") and head["min"] >= head["paper"] else "missed"
        else:
            measured, verdict = f"no figure ({d.get('status')})", "not measured"
        lines.append(f"| {TECHNIQUE_OF[name]} (`{name}`) | {settings[:160]} | {measured} | {_prediction(d, readiness, name)} | "
                     f"{d.get('paper') or '–'} | {verdict} |")  # fmt: skip
    return lines


def _profile_lines(profiles: dict[str, Any]) -> list[str]:
    lines = []
    for variant, prof in profiles.items():
        if not prof:
            continue
        busy = f", GPU busy {100 * prof['busy_fraction']:.0f}% of {prof['wall_ms']:.1f} ms" if "busy_fraction" in prof else ""
        lines += ["", f"Profile of **{variant}**{busy}; syncs {json.dumps(prof.get('syncs'))}:", "",
                  "| kernel / op | ms | calls |", "|---|---|---|"]  # fmt: skip
        lines += [f"| `{k['name'][:90]}` | {k['ms']:.3g} | {k['calls']} |" for k in prof.get("kernels", [])]
    return lines


def report(work: Path, out: Path, readiness_path: Path | None = None) -> None:
    """Merge the step files and run.sh's status lines into one markdown report and one JSON."""
    statuses: dict[str, dict] = {}
    status_file = work / "status.tsv"
    if status_file.exists():
        for line in status_file.read_text().splitlines():
            name, rc, secs, cap = (line.split("\t") + ["", "", "", ""])[:4]
            statuses[name] = {"rc": rc, "seconds": secs, "cap_s": cap}
    steps = {}
    for name in STEPS:
        p = work / f"{name}.json"
        steps[name] = json.loads(p.read_text()) if p.exists() else {"step": name, "status": "missing"}
    readiness = _readiness(readiness_path)
    pytest_tail = (work / "pytest.txt").read_text().strip().splitlines()[-25:] if (work / "pytest.txt").exists() else []
    figures = {"statuses": statuses, "steps": steps, "readiness": readiness}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_figures.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    lines = ["# mmaccel GPU check (second version)", "", "## Summary", "", *summary_table(steps, readiness), ""]
    lines += ["| stage | exit | seconds | cap s | meaning |", "|---|---|---|---|---|"]
    meaning = {"0": "ok", "124": "KILLED at its time cap", "137": "KILLED (cap or memory)", "5": "no tests collected"}
    for name, st in statuses.items():
        lines.append(f"| {name} | {st['rc']} | {st['seconds']} | {st['cap_s']} | {meaning.get(st['rc'], 'FAILED')} |")
    env = steps["env"].get("settings", {})
    lines += ["", f"Environment: `{json.dumps(env, default=str)}`"]
    for name in STEPS[1:]:
        d = steps[name]
        lines += ["", f"## {name}: {d.get('status')}", ""]
        if d.get("paper"):
            lines.append(f"Paper target: {d['paper']}.")
        head = d.get("figures", {}).get("headline")
        if head:
            paper = f" vs paper {head['paper']}x" if head.get("paper") else ""
            lines.append(f"**{head['figure']}: {head['value']:.2f}x ({head['min']:.2f}-{head['max']:.2f})**{paper}.")
        if d.get("settings"):
            lines.append(f"Settings: `{json.dumps(d['settings'], default=str)}`")
        for when in ("gpu_before", "gpu_after"):
            if d.get(when):
                lines.append(f"GPU {when[4:]}: `{json.dumps(d[when], default=str)}`")
        if d.get("rows"):
            lines += ["", "| " + " | ".join(d["headers"]) + " |", "|" + "---|" * len(d["headers"])]
            lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in d["rows"]]
        lines += [""] + [f"- {n}" for n in d.get("notes", [])]
        lines += _profile_lines(d.get("profiles", {}))
        if d.get("traceback"):
            lines += ["", "```", *d["traceback"].strip().splitlines()[-15:], "```"]
    lines += ["", "## pytest -m cuda (tail)", "", "```", *pytest_tail, "```"]
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu_report.md").read_text())


def _run_step(name: str, args: argparse.Namespace) -> int:
    try:
        STEP_FNS[name](args)
    except Exception as exc:  # keep what the step measured, say why it stopped, exit non-zero
        import traceback

        traceback.print_exc()
        path = args.work / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {"step": name, "notes": [], "paper": None}
        data["status"] = f"error: {type(exc).__name__}"
        data.setdefault("notes", []).append(f"ERROR {type(exc).__name__}: {str(exc)[:500]}")
        data["traceback"] = traceback.format_exc()[-3000:]
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="+", choices=(*STEPS, "report"), metavar="STEP",
                        help=f"one or more of {', '.join(STEPS)}; or report")  # fmt: skip
    parser.add_argument("--work", type=Path, required=True, help="folder of the per-step JSON files")
    parser.add_argument("--out", type=Path, help="report: where gpu_report.md and gpu_figures.json go")
    parser.add_argument("--readiness", type=Path, help="report: bench_gpu_readiness's JSON (the CPU prediction)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes in fp32 (the dry run)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no stage past this many seconds")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variants")
    args = parser.parse_args(argv)
    args.compile_backend = "eager" if args.tiny else "inductor"
    args.gpu = "H100"
    if args.tiny:  # tiny shapes gain nothing from threads, and idle OpenMP workers spin on a shared CPU
        import torch

        torch.set_num_threads(1)
    if "report" in args.steps:
        if args.steps != ["report"] or args.out is None:
            parser.error("report runs alone and needs --out")
        report(args.work, args.out, args.readiness)
        return
    failed = [name for name in args.steps if _run_step(name, args)]
    if failed:
        sys.exit(f"steps failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
