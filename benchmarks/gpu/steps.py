"""GPU benchmark steps of ``benchmarks/gpu/run.sh``: real shapes in bf16, one subcommand per figure.

    python benchmarks/gpu/steps.py env     --work W            # requirements met? versions
    python benchmarks/gpu/steps.py hired   --work W [--tiny]   # HiRED 20% TTFT, LLaVA-NeXT-7B proportions
    python benchmarks/gpu/steps.py svg2    --work W [--tiny]   # SVG2 attention ~15% density, S=32K vs SDPA/flash
    python benchmarks/gpu/steps.py density --work W [--tiny]   # token density + FlexDiT, DiT-XL/2 512
    python benchmarks/gpu/steps.py nar     --work W [--tiny]   # NAR 24x24 images/s vs PAR-4X (KV cache)
    python benchmarks/gpu/steps.py clip    --work W [--tiny]   # clip parallelism: per-GPU memory, Wan 1.3B 81 frames
    python benchmarks/gpu/steps.py report  --work W --out OUTDIR

Each step writes ``W/<step>.json`` after every stage (a step killed at its time cap keeps what it
measured) and stops starting new stages past ``--budget-s``. Speed figures come from
``mmaccel.benchmarks.harness.compare``: warm-up per variant, >= 5 interleaved rounds, the median
ratio with its min-max spread. ``--tiny`` runs the same code on CPU-sized shapes in fp32 (the
dry run). ``report`` merges the step files and run.sh's status lines into ``OUTDIR/gpu_report.md``
and ``OUTDIR/gpu_figures.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = ("env", "hired", "svg2", "density", "nar", "clip")
PAPER = {
    "hired": "HiRED 20% budget: 4.6x TTFT (LLaVA-NeXT-7B, Tesla P40)",
    "svg2": "SVG2: 1.89x end to end on Wan 2.1 (attention ~15% density; attention-only speed-up is higher)",
    "density": "FlexDiT: 2.75x faster than DiT-XL/2 at 512 px (training-free token density: lower, see its docs)",
    "nar": "NAR: 2.4x images/s over PAR-4X at 24x24 (LlamaGen GPT-L, KV cache)",
    "clip": "Video-Infinity: per-GPU memory ~ 1/N of the video's activations (clips + halos + globals)",
}


class Step:
    """One step's record: settings, figures and table rows, written after every stage."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args, self.t0 = name, args, time.perf_counter()
        self.data: dict[str, Any] = {"step": name, "status": "running", "tiny": args.tiny, "settings": {},
                                     "figures": {}, "headers": [], "rows": [], "notes": [], "paper": PAPER.get(name)}  # fmt: skip
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
    return torch, device, dtype


def _compare(fns: dict[str, Callable[[], object]], device: str, repeats: int, memory: bool = False):
    """harness.compare; peak memory on CUDA only (the CPU tracker is a slow dispatch mode)."""
    from mmaccel.benchmarks.harness import compare

    return compare(fns, repeats=max(repeats, 5), warmup=1, device=device, memory=memory and device == "cuda")


def _spread(c) -> dict[str, float]:
    return {"ratio": c.ratio, "ratio_min": c.ratio_min, "ratio_max": c.ratio_max, "median_s": c.median_s,
            "min_s": min(c.times_s), "max_s": max(c.times_s), "within_noise": c.overlaps}  # fmt: skip


def _maybe_compile(torch, fn, args):
    return torch.compile(fn, dynamic=False) if args.compile and not args.tiny else fn


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
                          "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}  # fmt: skip
    s.data["figures"] = {"versions": versions, "problems": problems}
    s.data["notes"] += problems
    for p in problems:
        print(f"[env] {p}", flush=True)
    s.save("ok" if not problems else "failed")
    if problems:
        sys.exit(1)


# ---------------------------------------------------------------------------------------- hired
HIRED_SHAPES = {
    # LLaVA-NeXT-7B: CLIP ViT-L/14-336 (24 x 1024) + Vicuna-7B (32 x 4096, ffn 11008). Both depths
    # scaled by 1/4: widths, token counts and the vision / LM cost ratio of the real model are kept.
    "real": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16),
                 text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32),
                 image_size=336, batch=1),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
                 image_size=56, batch=1),
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
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
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


def step_hired(args: argparse.Namespace) -> None:
    from mmaccel.runtime.budget import TokenBudget
    from mmaccel.testing import tiny_image
    from mmaccel.vlm import HiREDConfig, apply_hired

    torch, device, dtype = _setup(args)
    s = Step("hired", args)
    shape = HIRED_SHAPES["tiny" if args.tiny else "real"]
    model, processor = _llava_next(torch, shape, device, dtype)
    b, batch = shape["image_size"], shape["batch"]
    images = [tiny_image(2 * b, 2 * b, seed=i) for i in range(batch)]
    prompt = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
    inputs = processor(images=images, text=[prompt] * batch, return_tensors="pt", padding=True)
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vis, lm = params(model.model.vision_tower), params(model.model.language_model)
    s.data["settings"] = {"shape": shape, "dtype": str(dtype), "device": device, "seq_len": inputs["input_ids"].shape[1],
                          "vision_params_M": vis / 1e6, "lm_params_M": lm / 1e6, "vision_pct_of_lm": 100 * vis / lm,
                          "image_px": 2 * b, "partitions": 5, "compile": False}  # fmt: skip
    s.data["notes"].append("TTFT = generate(max_new_tokens=1): vision tower, HiRED scoring/selection, LM prefill, "
                           "first token; eager (generate's shapes change per budget). LLaVA-NeXT-7B widths and "
                           "token counts, depths 1/4 (LM 8 of 32, CLIP 6 of 24 layers), random weights.")  # fmt: skip
    s.data["headers"] = ["variant", "visual tokens", "TTFT s (min-max)", "TTFT speed-up (min-max)", "peak MiB"]

    if not s.stage("dense vs HiRED 40% / 20% TTFT", 20):
        s.save("skipped")
        return
    import copy

    def ttft(m):
        def run():
            with torch.inference_mode():
                m.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)

        return run

    models, handles = {"dense": model}, {}
    for ratio in (0.4, 0.2):  # one patched copy per budget: no apply/remove inside the timed calls
        name = f"HiRED {ratio:.0%}"
        models[name] = copy.deepcopy(model)
        handles[name] = apply_hired(models[name], HiREDConfig(budget=TokenBudget(ratio=ratio)))
    result = _compare({name: ttft(m) for name, m in models.items()}, device, args.repeats, memory=True)
    handles = {name: h.stats.summary() for name, h in handles.items()}
    dense_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum()) // batch
    for name, c in result.items():
        kept = handles.get(name, {}).get("kept_ratio")
        tokens = dense_tokens if name == "dense" else (round(kept * dense_tokens) if kept else None)
        s.row(name, tokens, c.time_text(), "1.00x (baseline)" if name == "dense" else c.ratio_text(),
              None if c.peak_bytes is None else c.peak_bytes / 2**20)
        s.data["figures"][name] = {**_spread(c), "visual_tokens": tokens}
    s.data["figures"]["headline"] = {"figure": "HiRED 20% TTFT speed-up", "value": result["HiRED 20%"].ratio,
                                     "min": result["HiRED 20%"].ratio_min, "max": result["HiRED 20%"].ratio_max,
                                     "paper": 4.6}  # fmt: skip
    s.save("ok")


# ----------------------------------------------------------------------------------------- svg2
def _clustered_qkv(torch, b: int, h: int, s: int, d: int, groups: int, device: str, dtype, seed: int = 0):
    """q/k/v whose tokens belong to ``groups`` semantic groups (as video objects do): attention
    concentrates within a group, so a top-p cluster selection reaches video-like densities."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centers = torch.randn(h, groups, d, generator=g)
    label = torch.randint(0, groups, (h, s), generator=g)
    base = torch.gather(centers, 1, label[..., None].expand(h, s, d)) * 1.5
    q = base + 0.6 * torch.randn(b, h, s, d, generator=g)
    k = base + 0.6 * torch.randn(b, h, s, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g)
    return (x.to(device, dtype) for x in (q, k, v))


def step_svg2(args: argparse.Namespace) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmaccel.sparse_attn import (
        SparseAttentionState,
        SVG2Config,
        cluster_sparse_attention,
        semantic_sparse_attention,
    )

    torch, device, dtype = _setup(args)
    s = Step("svg2", args)
    F = torch.nn.functional
    # Wan 2.1 1.3B: 12 heads x 128; 81 frames at 480x832 -> 21 x 30 x 52 = 32,760 video tokens.
    b, h, seq, d = (1, 1, 384, 16) if args.tiny else (1, 12, 32760, 128)
    qc, kc = (8, 16) if args.tiny else (128, 424)  # the reference's 300 / 1000 at 76K tokens, scaled to S
    q, k, v = _clustered_qkv(torch, b, h, seq, d, 12 if args.tiny else 96, device, dtype)
    backend = "auto" if args.tiny else "flex"
    s.data["settings"] = {"B": b, "H": h, "S": seq, "D": d, "q_clusters": qc, "k_clusters": kc, "dtype": str(dtype),
                          "device": device, "backend": backend}  # fmt: skip
    s.data["notes"].append("Synthetic q/k with 96 semantic groups per head (attention concentrates in a group, "
                           "as in video); top_p calibrated to the density closest to 15%. 'SVG2 attention' = "
                           "cluster selection + the sparse kernel on fixed clusters; 'SVG2 step' adds the warm "
                           "k-means (2 iterations), as every sparse denoising step after the first runs it.")  # fmt: skip
    if not s.stage("top_p calibration (cold k-means)", 15):
        s.save("skipped")
        return
    state = SparseAttentionState()
    chosen, best = None, None
    for top_p in (0.9, 0.5) if args.tiny else (0.9, 0.75, 0.6, 0.45, 0.3):
        config = SVG2Config(num_q_clusters=qc, num_k_clusters=kc, top_p=top_p, min_kc_ratio=0.02, backend=backend,
                            dense_steps=0.0, dense_layers=0.0, kmeans_init_iters=5 if args.tiny else 50)  # fmt: skip
        with torch.no_grad():
            semantic_sparse_attention(q, k, v, config, state)
        density = state.last.density
        s.data["figures"].setdefault("calibration", {})[str(top_p)] = density
        if best is None or abs(density - 0.15) < best:
            chosen, best = config, abs(density - 0.15)
    config = chosen
    with torch.no_grad():
        semantic_sparse_attention(q, k, v, config, state)
    ql, kl = state.q_labels.reshape(b, h, seq), state.k_labels.reshape(b, h, seq)
    s.data["settings"].update(top_p=config.top_p, density=state.last.density, kernel=state.last.backend)
    s.save()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v)

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v)

    def svg2_attention():
        cluster_sparse_attention(q, k, v, ql, kl, config)

    def svg2_step():
        semantic_sparse_attention(q, k, v, config, state)

    fns = {"SDPA (default)": sdpa}
    if device == "cuda":
        fns["SDPA flash"] = flash
    fns |= {"SVG2 attention": svg2_attention, "SVG2 step (warm k-means + attention)": svg2_step}
    if not s.stage("SDPA / flash / SVG2 timing", 20):
        s.save("partial")
        return
    with torch.no_grad():
        result = _compare(fns, device, args.repeats)
    s.data["headers"] = ["variant", "time s (min-max)", "speed-up vs SDPA (min-max)"]
    for name, c in result.items():
        s.row(name, c.time_text(), c.ratio_text())
        s.data["figures"][name] = _spread(c)
    if "SDPA flash" in result:  # the ratio against the flash kernel: from the same rounds
        att, fl = result["SVG2 attention"], result["SDPA flash"]
        ratios = sorted(f / a for f, a in zip(fl.times_s, att.times_s))
        s.data["figures"]["SVG2 attention vs flash"] = {"ratio": ratios[len(ratios) // 2], "ratio_min": ratios[0],
                                                        "ratio_max": ratios[-1]}  # fmt: skip
    head = result["SVG2 attention"]
    s.data["figures"]["headline"] = {"figure": f"SVG2 attention at {state.last.density:.0%} density vs SDPA, S={seq}",
                                     "value": head.ratio, "min": head.ratio_min, "max": head.ratio_max,
                                     "paper": 1.89}  # fmt: skip
    s.save("ok")


# -------------------------------------------------------------------------------------- density
def _dit_xl(torch, tiny: bool, device: str, dtype):
    from diffusers import DiTTransformer2DModel

    cfg = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=64)  # DiT-XL/2, 512 px
    if tiny:
        cfg = dict(num_attention_heads=2, attention_head_dim=16, num_layers=6, sample_size=16)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, attention_bias=True,
                                      activation_fn="gelu-approximate", norm_type="ada_norm_zero",
                                      num_embeds_ada_norm=1000, norm_elementwise_affine=False, **cfg)  # fmt: skip
    return model.to(dtype).eval()


def step_density(args: argparse.Namespace) -> None:
    import copy

    from mmaccel.diffusion import FlexDiTConfig, TokenDensityConfig, apply_token_density, convert_to_flexdit

    torch, device, dtype = _setup(args)
    s = Step("density", args)
    model = _dit_xl(torch, args.tiny, device, dtype)
    batch = 2 if args.tiny else 16
    size = model.config.sample_size
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, 4, size, size, generator=g).to(device, dtype),
                  timestep=torch.full((batch,), 500, device=device),
                  class_labels=torch.randint(0, 1000, (batch,), generator=g).to(device))  # fmt: skip
    s.data["settings"] = {"model": "DiT-XL/2 (28 x 1152, random weights)" if not args.tiny else "tiny 6-block DiT",
                          "latent": size, "tokens": (size // 2) ** 2, "batch": batch, "timestep": 500,
                          "dtype": str(dtype), "compile": bool(args.compile and not args.tiny)}  # fmt: skip
    s.data["notes"].append("One transformer forward at t=500 (mid-denoising; token density reduces there by "
                           "default). FlexDiT = convert_to_flexdit with the paper's layout (random weights: speed "
                           "only, no distillation). Compiled variants use torch.compile(dynamic=False).")  # fmt: skip
    layout = FlexDiTConfig()  # the paper's DiT-XL/2 layout; tiny: 1 Poolingformer, one SDTM, 1 dense block
    if args.tiny:
        layout = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=1,
                               sparse_grid=(4, 4))  # fmt: skip
    flex = convert_to_flexdit(copy.deepcopy(model), layout).to(device, dtype).eval()
    reduced = copy.deepcopy(model)  # patched for the whole step: no apply/remove inside the timed calls
    handle = apply_token_density(reduced, TokenDensityConfig())
    models = {"dense": model, "token density": reduced, "FlexDiT": flex}

    def call(m):
        def run():
            with torch.no_grad():
                m(**inputs)

        return run

    def record(label: str, result) -> None:
        for name, c in result.items():
            s.row(f"{name} ({label})", c.time_text(), c.ratio_text(), batch / c.median_s,
                  None if c.peak_bytes is None else c.peak_bytes / 2**20)
            s.data["figures"][f"{name} ({label})"] = _spread(c)
        s.data["figures"]["headline"] = {"figure": f"FlexDiT forward speed-up ({label})",
                                         "value": result["FlexDiT"].ratio, "min": result["FlexDiT"].ratio_min,
                                         "max": result["FlexDiT"].ratio_max, "paper": 2.75}  # fmt: skip
        s.data["figures"]["token_density_stats"] = handle.stats.summary()
        s.save()

    s.data["headers"] = ["variant", "time s (min-max)", "speed-up vs dense (min-max)", "images/s", "peak MiB"]
    if not s.stage("eager: dense / token density / FlexDiT", 20):
        s.save("skipped")
        return
    record("eager", _compare({n: call(m) for n, m in models.items()}, device, args.repeats, memory=True))
    if args.compile and not args.tiny and s.stage("compiled: dense / token density / FlexDiT", 55):
        compiled = {n: torch.compile(m, dynamic=False) for n, m in models.items()}
        record("compiled", _compare({n: call(m) for n, m in compiled.items()}, device, args.repeats))
    s.save("ok")


# ------------------------------------------------------------------------------------------ nar
def step_nar(args: argparse.Namespace) -> None:
    from mmaccel.tokenizers_img import (
        GPT,
        GPTConfig,
        SamplingConfig,
        decode,
        nar_schedule,
        par_schedule,
    )

    torch, device, dtype = _setup(args)
    s = Step("nar", args)
    if args.tiny:
        cfg, grid, batch = GPTConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, num_classes=10), 4, 2
    else:  # LlamaGen GPT-L (24 x 1024, 16 heads), 384 px = 24 x 24 tokens, NAR head
        cfg, grid, batch = GPTConfig(vocab_size=16384, dim=1024, n_layer=24, n_head=16), 24, 16
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg).eval()
    model = model.to(dtype)
    cond = torch.arange(batch, device=device) % cfg.num_classes
    sampling = SamplingConfig(top_k=2000 if not args.tiny else 0)
    s.data["settings"] = {"model": f"GPT {cfg.n_layer} x {cfg.dim}", "grid": grid, "batch": batch, "dtype": str(dtype),
                          "kv_cache": True, "sampling": "top_k 2000, temperature 1, no CFG"}  # fmt: skip
    s.data["notes"].append("Random-weight LlamaGen GPT-L with the NAR head; every order decodes the same grid "
                           "with its KV cache. PAR-4X = par_schedule(h, w, 2): 4 regions decoded in parallel.")  # fmt: skip
    passes = {}

    def order(name, schedule):
        def run():
            with torch.inference_mode():
                out = decode(model, cond, schedule, sampling, use_cache=True,
                             generator=torch.Generator(device).manual_seed(0))  # fmt: skip
            passes[name] = out.forward_passes

        return run

    # Raster order (576 forwards) is not timed: on the first H200 run (2026-12-04) the three orders
    # did not finish one timed round in 78 s; the paper's figure is NAR over PAR-4X.
    fns = {"PAR-4X": order("PAR-4X", par_schedule(grid, grid, 2)),
           "NAR": order("NAR", nar_schedule(grid, grid))}  # fmt: skip
    s.data["notes"].append(f"raster order not timed ({grid * grid} forwards per image batch).")
    if not s.stage("PAR-4X / NAR decoding", 25):
        s.save("skipped")
        return
    result = _compare(fns, device, args.repeats, memory=True)
    s.data["headers"] = ["order", "forward passes", "s / batch (min-max)", "images/s", "speed-up vs PAR-4X",
                         "peak MiB"]  # fmt: skip
    for name, c in result.items():
        s.row(name, passes.get(name), c.time_text(), batch / c.median_s, c.ratio_text(),
              None if c.peak_bytes is None else c.peak_bytes / 2**20)
        s.data["figures"][name] = {**_spread(c), "images_per_s": batch / c.median_s, "forward_passes": passes.get(name)}
    nar, par = result["NAR"], result["PAR-4X"]
    ratios = sorted(p / n for p, n in zip(par.times_s, nar.times_s))
    s.data["figures"]["headline"] = {"figure": "NAR images/s over PAR-4X, 24x24", "value": ratios[len(ratios) // 2],
                                     "min": ratios[0], "max": ratios[-1], "paper": 2.4}  # fmt: skip
    s.save("ok")


# ----------------------------------------------------------------------------------------- clip
def step_clip(args: argparse.Namespace) -> None:
    from diffusers import WanTransformer3DModel

    from mmaccel.parallel_video import ClipParallelConfig, apply_clip_parallel
    from mmaccel.runtime.distributed import init_distributed

    torch, device, dtype = _setup(args)
    s = Step("clip", args)
    if args.tiny:
        cfg, frames, hw = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2), 9, (8, 12)
    else:  # Wan 2.1 T2V 1.3B; 81 frames at 480 x 832 -> 21 latent frames of 60 x 104
        cfg, frames, hw = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30), 21, (60, 104)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096,
                                      freq_dim=256, **cfg)  # fmt: skip
    model = model.to(dtype).eval()
    text = torch.randn(1, 512 if not args.tiny else 8, 4096, device=device, dtype=dtype)
    config = ClipParallelConfig()
    s.data["settings"] = {"model": f"Wan transformer {cfg['num_layers']} x {cfg['num_attention_heads'] * cfg['attention_head_dim']}",
                          "latent_frames": frames, "latent_hw": hw, "dtype": str(dtype),
                          "padding": config.padding, "global_frames": config.global_frames}  # fmt: skip
    s.data["notes"].append("Per-GPU memory at N GPUs, bracketed on one GPU: peak of one transformer forward on the "
                           "rank's own clip frames (lower bound) and on all frames it holds (clip, halos, global "
                           "frames; ClipParallelConfig.plan: upper bound), weights included. "
                           "N=1 runs apply_clip_parallel at world size 1 (the full video) against the plain model.")  # fmt: skip
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

    if not s.stage("full video: plain and apply_clip_parallel at world size 1", 15):
        s.save("skipped")
        return
    forward(frames)  # warm-up
    base_mib, base_s = peak(lambda: forward(frames))
    ctx = init_distributed()
    with apply_clip_parallel(model, config, ctx=ctx, num_latent_frames=frames):
        forward(frames)
        clip_mib, clip_s = peak(lambda: forward(frames))
    s.row("1 (plain)", frames, base_mib, base_s, 1.0)
    s.row("1 (apply_clip_parallel)", frames, clip_mib, clip_s, clip_mib / base_mib if base_mib == base_mib else None)
    s.data["figures"]["world1"] = {"plain_mib": base_mib, "clip_parallel_mib": clip_mib}
    for n in (2,) if args.tiny else (2, 4, 8):
        if not s.stage(f"{n} GPUs: one rank's frames", 8):
            break
        plan = config.plan(frames, n)
        own = max(end - start for start, end in plan.clips)
        held = min(frames, max(plan.window(r)[1] - plan.window(r)[0] + len(plan.global_indices) for r in range(n)))
        low, _ = peak(lambda: forward(own))  # noqa: B023
        mib, sec = peak(lambda: forward(held))  # noqa: B023
        s.row(n, f"{own} own / {held} held", f"{low:.0f}-{mib:.0f}", sec, mib / base_mib if base_mib == base_mib else None)
        s.data["figures"][f"world{n}"] = {"frames_own": own, "frames_held": held, "peak_mib_own": low, "peak_mib_held": mib}
    s.save("ok")


# --------------------------------------------------------------------------------------- report
def report(work: Path, out: Path) -> None:
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
    info = (work / "info.txt").read_text() if (work / "info.txt").exists() else ""
    pytest_tail = (work / "pytest.txt").read_text().strip().splitlines()[-25:] if (work / "pytest.txt").exists() else []
    figures = {"statuses": statuses, "steps": steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_figures.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    lines = ["# mmaccel GPU check", ""]
    lines += ["| step | exit | seconds | cap s | meaning |", "|---|---|---|---|---|"]
    meaning = {"0": "ok", "124": "KILLED at its time cap", "137": "KILLED (cap or memory)", "5": "no tests collected"}
    for name, st in statuses.items():
        lines.append(f"| {name} | {st['rc']} | {st['seconds']} | {st['cap_s']} | {meaning.get(st['rc'], 'FAILED')} |")
    lines += ["", "## mmaccel info", "", "```", info.strip(), "```", "", "## pytest -m cuda (tail)", "", "```",
              *pytest_tail, "```"]  # fmt: skip
    for name in STEPS[1:]:
        d = steps[name]
        lines += ["", f"## {name}: {d.get('status')}", ""]
        if d.get("paper"):
            lines.append(f"Paper target: {d['paper']}.")
        head = d.get("figures", {}).get("headline")
        if head:
            lines.append(f"**{head['figure']}: {head['value']:.2f}x ({head['min']:.2f}-{head['max']:.2f})** "
                         f"vs paper {head['paper']}x.")  # fmt: skip
        if d.get("settings"):
            lines.append(f"Settings: `{json.dumps(d['settings'], default=str)}`")
        if d.get("rows"):
            lines += ["", "| " + " | ".join(d["headers"]) + " |", "|" + "---|" * len(d["headers"])]
            lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in d["rows"]]
        lines += [""] + [f"- {n}" for n in d.get("notes", [])]
        if d.get("traceback"):
            lines += ["", "```", *d["traceback"].strip().splitlines()[-15:], "```"]
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu_report.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=(*STEPS, "report"))
    parser.add_argument("--work", type=Path, required=True, help="folder of the per-step JSON files")
    parser.add_argument("--out", type=Path, help="report: where gpu_report.md and gpu_figures.json go")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes in fp32 (the dry run)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (>= 5)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no stage past this many seconds")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    args = parser.parse_args(argv)
    if args.step == "report":
        if args.out is None:
            parser.error("report needs --out")
        report(args.work, args.out)
        return
    fn = {"env": step_env, "hired": step_hired, "svg2": step_svg2, "density": step_density, "nar": step_nar,
          "clip": step_clip}[args.step]  # fmt: skip
    try:
        fn(args)
    except Exception as exc:  # keep what the step measured, say why it stopped, exit non-zero
        import traceback

        path = args.work / f"{args.step}.json"
        data = json.loads(path.read_text()) if path.exists() else {"step": args.step, "notes": [], "paper": None}
        data["status"] = f"error: {type(exc).__name__}"
        data.setdefault("notes", []).append(f"ERROR {type(exc).__name__}: {str(exc)[:500]}")
        data["traceback"] = traceback.format_exc()[-3000:]
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        raise


if __name__ == "__main__":
    main()
