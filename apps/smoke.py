"""End-to-end smoke run: every technique, dense vs accelerated, on the built-in tiny models.

This checks that each plugin runs through the real pipeline/model classes and reports the
fidelity against the dense run of the same model and inputs. The models are tiny and random,
so the timings show overheads, not speed-ups; the benchmarks measure speed at real sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SmokeResult", "SMOKE_CHECKS", "run_smoke", "format_results"]


@dataclass(frozen=True)
class SmokeResult:
    technique: str
    model: str
    dense_s: float
    accelerated_s: float
    fidelity: str
    tokens: str


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)  # outputs are in [0, 1]


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _hired() -> SmokeResult:
    from apps.tiny_models import tiny_image, tiny_llava_next
    from runtime import TokenBudget
    from vlm import HiREDConfig, apply_hired

    model, processor = tiny_llava_next()
    inputs = processor(
        images=[tiny_image(128, 128, seed=3)], text=["USER: <image>\nWhat is it? ASSISTANT:"], return_tensors="pt"
    )
    with torch.no_grad():
        dense, t_dense = _timed(lambda: model(**inputs).logits[0, -1])
        with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.2))) as handle:
            fast, t_fast = _timed(lambda: model(**inputs).logits[0, -1])
            sel = handle.last_selections[0]
    kl = torch.nn.functional.kl_div(fast.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="sum")
    agree = int(fast.argmax() == dense.argmax())
    return SmokeResult(
        "HiRED 20%",
        "LlavaNextForConditionalGeneration",
        t_dense,
        t_fast,
        f"next-token top-1 agree {agree}, KL {kl.item():.3g}",
        f"visual {sel.tokens_before} -> {sel.tokens_after}",
    )


def _token_density() -> SmokeResult:
    from apps.tiny_models import call_kwargs, tiny_dit_pipeline
    from diffusion.token_density import TokenDensityConfig, apply_token_density

    pipe = tiny_dit_pipeline()
    dense, t_dense = _timed(lambda: pipe(**call_kwargs("dit")).images)
    with apply_token_density(pipe.transformer, TokenDensityConfig()) as handle:
        fast, t_fast = _timed(lambda: pipe(**call_kwargs("dit")).images)
        ratio = handle.stats.token_ratio
    return SmokeResult(
        "token density (default)",
        "DiTPipeline",
        t_dense,
        t_fast,
        f"image PSNR {_psnr(fast, dense):.1f} dB",
        f"token ratio {ratio:.2f}",
    )


def _svg2() -> SmokeResult:
    from apps.tiny_models import call_kwargs, tiny_wan_pipeline
    from sparse_attn import SVG2Config, apply_sparse_attention, pipeline_progress

    pipe = tiny_wan_pipeline()
    kwargs = call_kwargs("wan") | {"num_inference_steps": 4}
    dense, t_dense = _timed(lambda: pipe(**kwargs).frames)
    config = SVG2Config(num_q_clusters=8, num_k_clusters=16, dense_steps=0.25, dense_layers=0.0)
    with apply_sparse_attention(pipe.transformer, config, pipeline_progress(pipe)) as handle:
        kwargs = call_kwargs("wan") | {"num_inference_steps": 4}
        fast, t_fast = _timed(lambda: pipe(**kwargs).frames)
        summary = handle.stats.summary()
    density = summary.get("mean_density") if isinstance(summary, dict) else None
    return SmokeResult(
        "SVG2 sparse attention",
        "WanPipeline",
        t_dense,
        t_fast,
        f"video PSNR {_psnr(fast, dense):.1f} dB",
        f"mean density {density:.2f}" if density is not None else "density: see stats",
    )


def _nar() -> SmokeResult:
    from tokenizers_img.gpt import GPT, GPTConfig
    from tokenizers_img.nar import generate_nar
    from tokenizers_img.raster import generate_raster
    from tokenizers_img.sampling import SamplingConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, dim=64, n_layer=2, n_head=4, num_classes=10, multiple_of=32)).eval()
    labels = torch.tensor([1, 2])
    sampling = SamplingConfig(temperature=1.0, top_k=16)
    with torch.no_grad():
        raster, t_dense = _timed(
            lambda: generate_raster(gpt, labels, grid=(8, 8), sampling=sampling, generator=torch.Generator().manual_seed(0))
        )
        nar, t_fast = _timed(
            lambda: generate_nar(gpt, labels, grid=(8, 8), sampling=sampling, generator=torch.Generator().manual_seed(0))
        )
    return SmokeResult(
        "NAR decoding",
        "LlamaGen-style GPT",
        t_dense,
        t_fast,
        "different order: compare samples, not tokens",
        f"forwards {raster.forward_passes} -> {nar.forward_passes}",
    )


SMOKE_CHECKS: dict[str, Callable[[], SmokeResult]] = {
    "hired": _hired,
    "token_density": _token_density,
    "svg2": _svg2,
    "nar": _nar,
}


def run_smoke(names: list[str] | None = None) -> list[SmokeResult]:
    """Run the named checks (all by default) and return their results."""
    names = list(SMOKE_CHECKS) if names is None else names
    unknown = sorted(set(names) - set(SMOKE_CHECKS))
    if unknown:
        raise ValueError(f"unknown smoke check(s) {unknown}; choose from {sorted(SMOKE_CHECKS)}")
    return [SMOKE_CHECKS[name]() for name in names]


def format_results(results: list[SmokeResult]) -> str:
    from benchmarks.harness import markdown_table

    rows = [
        [r.technique, r.model, f"{r.dense_s:.3f}", f"{r.accelerated_s:.3f}", r.fidelity, r.tokens] for r in results
    ]
    return markdown_table(["technique", "tiny model", "dense s", "accelerated s", "fidelity vs dense", "tokens"], rows)
