"""The GPU steps' floors, predicted on the CPU before any GPU run: FLOPs and bytes of each
baseline at the papers' shapes, and what the technique's own arithmetic allows.

    .venv/bin/python benchmarks/gpu/predict.py [--write]    # prints (and writes) results/gpu_prediction.md

Parameters are counted exactly on models built on the meta device (no memory, no init). FLOPs:
``2 x (parameters of the repeated blocks) x tokens`` for the linear layers, ``4 x layers x S^2 x
width`` for self-attention (``S x T`` for cross-attention). Floor = max(FLOPs / 989 TFLOP/s,
weight bytes / HBM bandwidth) on an H100 (3.35 TB/s) and an H200 (4.8 TB/s): no kernel can be
faster, and a measured time far above it is overhead (launches, host syncs, small tiles, layout).
The technique rows count only what the technique removes (SVG2: the unselected attention pairs;
HiRED: the pruned visual tokens in the LM; NAR: forward passes, each at least one weight read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profiling as P  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_prediction.md"
# Measured on the first grant (one H200, 2026-12-04; results/gpu_h200.md), for comparison
H200_MEASURED = {
    "svg2: SDPA (dense)": "10.6 ms (cuDNN)",
    "svg2: SVG2 attention, density 0.026": "13.0 ms",
    "density: DiT-XL/2 dense": "46 ms, 52 ms (two runs)",
}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _on_meta(build):
    with torch.device("meta"):
        return build()


def rows() -> list[dict]:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, WanTransformer3DModel

    from mmaccel.tokenizers_img import GPT, GPTConfig

    out = []

    def add(name: str, flops: float, nbytes: float, note: str = "") -> None:
        out.append({"name": name, "flops": flops, "bytes": nbytes, "h100_ms": 1e3 * P.floor_s(flops, nbytes, "H100"),
                    "h200_ms": 1e3 * P.floor_s(flops, nbytes, "H200"), "note": note,
                    "h200_measured": H200_MEASURED.get(name, "")})  # fmt: skip

    # svg2 / wan14b: attention alone (B 1); SVG2 at the first grant's density and the readiness tile densities
    for step, h, s in (("svg2", 12, 32760), ("wan14b", 40, 75600)):
        dense = 4.0 * h * s * s * 128
        io = 4 * h * s * 128 * 2
        add(f"{step}: SDPA (dense)", dense, io, f"{h} heads x 128, S = {s:,}")
        add(f"{step}: SVG2 attention, density 0.026", dense * 0.026, io, "exact pairs (the first grant's density)")
        add(f"{step}: SVG2 attention, 128 x 64 tiles at 2.6x the pairs", dense * 0.026 * 2.6, io,
            "tile waste from the readiness table (0.068 / 0.027 at min_kc_ratio 0.02)")  # fmt: skip
    # density: DiT-XL/2 512 px, batch 16
    dit = _on_meta(lambda: DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, num_layers=28,
                                                 sample_size=64, in_channels=4, out_channels=8, patch_size=2,
                                                 norm_type="ada_norm_zero", num_embeds_ada_norm=1000))  # fmt: skip
    tokens, width = 16 * 1024, 1152
    blocks = sum(_params(b) for b in dit.transformer_blocks)
    adaln = sum(_params(b.norm1) for b in dit.transformer_blocks)  # per-sample modulation, not per token
    flops = 2.0 * (blocks - adaln) * tokens + 4.0 * 28 * 16 * 1024**2 * width
    add("density: DiT-XL/2 dense", flops, 2 * _params(dit), "batch 16 x 1,024 tokens, 28 x 1152")
    # wan: Wan 2.1 1.3B forward, 32,760 video tokens, 512 text tokens
    wan = _on_meta(lambda: WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                                                 ffn_dim=8960, num_layers=30))  # fmt: skip
    s, t, width = 32760, 512, 1536
    cross_kv = sum(_params(b.attn2.to_k) + _params(b.attn2.to_v) for b in wan.blocks)  # run on the 512 text tokens
    linear = 2.0 * (sum(_params(b) for b in wan.blocks) - cross_kv) * s + 2.0 * cross_kv * t
    self_attn, cross = 4.0 * 30 * s * s * width, 4.0 * 30 * s * t * width
    add("wan: Wan 1.3B dense", linear + self_attn + cross, 2 * _params(wan), "30 x 1536, S = 32,760")
    add("wan: Wan 1.3B, SVG2 at density 0.026 (exact pairs)", linear + 0.026 * self_attn + cross, 2 * _params(wan),
        f"self-attention is {self_attn / (linear + self_attn + cross):.0%} of the dense FLOPs")  # fmt: skip
    # pixart: PixArt-Sigma-shaped at 2048 px, 16,384 tokens, 300 text tokens
    pix = _on_meta(lambda: PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, num_layers=28,
                                                    sample_size=256, in_channels=4, out_channels=8, patch_size=2,
                                                    norm_type="ada_norm_single", cross_attention_dim=1152,
                                                    caption_channels=4096, use_additional_conditions=False))  # fmt: skip
    s, t, width = 16384, 300, 1152
    cross_kv = sum(_params(b.attn2.to_k) + _params(b.attn2.to_v) for b in pix.transformer_blocks)
    linear = 2.0 * (sum(_params(b) for b in pix.transformer_blocks) - cross_kv) * s + 2.0 * cross_kv * t
    self_attn = 4.0 * 28 * s * s * width
    add("pixart: PixArt-Sigma 2048 px dense", linear + self_attn + 4.0 * 28 * s * t * width, 2 * _params(pix),
        f"self-attention is {self_attn / (linear + self_attn):.0%} of the dense FLOPs")  # fmt: skip
    # hired: LLaVA-NeXT-7B prefill (Llama-7B 32 x 4096 + CLIP ViT-L/14-336 on 5 crops of 577 tokens)
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

    lm = _on_meta(lambda: LlamaModel(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                 num_attention_heads=32, vocab_size=32064)))  # fmt: skip
    vit = _on_meta(lambda: CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, image_size=336,
                                                            num_hidden_layers=24, num_attention_heads=16, patch_size=14)))  # fmt: skip
    lm_params = sum(_params(layer) for layer in lm.layers)
    vit_params = sum(_params(layer) for layer in vit.get_submodule("encoder").layers)
    weights = 2 * (_params(lm) + 4096 * 32064 + _params(vit))  # + the LM head
    text, visual = 22, 2928
    vision = 2.0 * vit_params * 5 * 577 + 4.0 * 24 * 5 * 577**2 * 1024
    for batch in (1, 8):
        for label, kept in (("dense", visual), ("HiRED 20%", round(0.2 * visual))):
            n = text + kept
            lm = 2.0 * lm_params * n + 4.0 * 32 * n * n * 4096
            add(f"hired: LLaVA-NeXT-7B prefill, {label}, batch {batch}", batch * (vision + lm), weights,
                f"{n:,} LM tokens per image")  # fmt: skip
    # nar: LlamaGen GPT-L forwards (each reads the weights once at least)
    gpt = _on_meta(lambda: GPT(GPTConfig(vocab_size=16384, dim=1024, n_layer=24, n_head=16)))
    weights = 2 * _params(gpt)
    from mmaccel.tokenizers_img import nar_schedule, par_schedule

    for label, schedule in (("PAR-4X", par_schedule(24, 24, 2)), ("NAR", nar_schedule(24, 24))):
        passes = schedule.forward_passes
        add(f"nar: GPT-L 24 x 24, {label}, {passes} forwards", 2.0 * _params(gpt) * 576, passes * weights,
            "weight reads bound it at batch 1-16")  # fmt: skip
    return out


def table(data: list[dict]) -> str:
    from mmaccel.runtime.tables import markdown_table

    body = [[r["name"], f"{r['flops']:.3g}", f"{r['bytes'] / 1e9:.3g}", f"{r['h100_ms']:.3g}", f"{r['h200_ms']:.3g}",
             r["h200_measured"], r["note"]] for r in data]  # fmt: skip
    return markdown_table(["baseline / variant", "FLOPs", "GB read (floor)", "H100 floor ms", "H200 floor ms",
                           "H200 measured (2026-12-04)", "note"], body)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    args = parser.parse_args(argv)
    text = "# GPU floors predicted on the CPU (`benchmarks/gpu/predict.py`)\n\n" + table(rows()) + "\n"
    print(text)
    if args.write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
