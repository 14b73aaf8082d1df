"""Every technique's CUDA path on tiny models in bf16 (marker ``cuda``; run with ``-m cuda``).

Collected everywhere, skipped without CUDA. ``benchmarks/gpu/run.sh`` runs them first on the GPU
machine (docs/gpu.md). They check what CPU tests cannot: the kernels, dtypes and collectives that
exist only there (bf16 matmuls, compiled flex_attention on CUDA, NCCL, diffusers' flash backend).

Run as a script, this file is the clip-parallelism worker that ``torchrun`` launches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")]
BF16 = torch.bfloat16
PROMPTS = ["USER: <image>\nWhat is shown in the image? ASSISTANT:", "USER: <image>\nDescribe the picture. ASSISTANT:"]
CLIP_RUN = dict(frames=17, steps=3, height=32, width=48, padding=1, global_frames=2, phase_bias=10.0, seed=3)


def _vlm_inputs(processor, which: str):
    from mmaccel.testing import tiny_image

    processor.tokenizer.padding_side = "left"
    sizes = [(64, 64), (64, 128)] if which == "llava" else [(128, 128), (64, 128)]
    images = [tiny_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    return {k: (v.to("cuda", BF16) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits).float()


def _check_removed(model, inputs, dense):
    tokens, logits = _generate(model, inputs)
    assert torch.equal(tokens, dense[0]), "remove() did not restore the dense output"


def test_hired_llava_next_bf16():
    from mmaccel.runtime.budget import TokenBudget
    from mmaccel.testing import tiny_llava_next
    from mmaccel.vlm import HiREDConfig, apply_hired

    model, processor = tiny_llava_next(device="cuda", dtype=BF16)
    inputs = _vlm_inputs(processor, "llava_next")
    dense = _generate(model, inputs)
    with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.2))) as handle:
        tokens, logits = _generate(model, inputs)
        summary = handle.stats.summary()
    assert tokens.device.type == "cuda" and tokens.shape[0] == 2 and torch.isfinite(logits).all()
    assert summary["images"] == 2 and 0 < summary["kept_ratio"] < 0.5, summary
    _check_removed(model, inputs, dense)


def test_vista_llava_bf16():
    from mmaccel.testing import tiny_llava
    from mmaccel.vlm import apply_vista

    model, processor = tiny_llava(device="cuda", dtype=BF16)
    inputs = _vlm_inputs(processor, "llava")
    dense = _generate(model, inputs)
    with apply_vista(model) as handle:
        tokens, logits = _generate(model, inputs)
        summary = handle.stats.summary()
    assert torch.isfinite(logits).all() and summary["vectors_computed"] == 1 and summary["sla_mixes"] >= 4, summary
    _check_removed(model, inputs, dense)


def test_attention_balance_llava_bf16():
    from mmaccel.testing import tiny_llava
    from mmaccel.vlm import apply_attention_balance

    model, processor = tiny_llava(device="cuda", dtype=BF16)
    inputs = _vlm_inputs(processor, "llava")
    dense = _generate(model, inputs)
    with apply_attention_balance(model) as handle:
        tokens, logits = _generate(model, inputs)
        summary = handle.stats.summary()
    assert torch.isfinite(logits).all() and summary["images"] == 2 and summary["modulated_rows"] > 0, summary
    _check_removed(model, inputs, dense)


def _dit(num_layers: int = 6, sample_size: int = 32):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=num_layers, sample_size=sample_size, patch_size=2).eval().to("cuda", BF16)  # fmt: skip


def _dit_inputs(sample_size: int = 32, t: int = 500):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, sample_size, sample_size, generator=g).to("cuda", BF16)
    return dict(hidden_states=x, timestep=torch.tensor([t, t], device="cuda"),
                class_labels=torch.tensor([1, 5], device="cuda"))  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_token_density_dit_bf16_compiled():
    from mmaccel.diffusion import apply_token_density

    model, inputs = _dit(), _dit_inputs()
    with torch.no_grad():
        dense = model(**inputs).sample
        with apply_token_density(model) as handle:
            eager = model(**inputs).sample
            compiled = torch.compile(model)(**inputs).sample
            summary = handle.stats.summary()
        after = model(**inputs).sample
    assert eager.shape == dense.shape and torch.isfinite(eager).all()
    assert summary["reduced_forwards"] >= 1 and 0 < summary["token_ratio"] < 1, summary
    assert _rel(compiled, eager) < 0.05 and 0 < _rel(eager, dense) < 1.0
    assert torch.equal(after, dense)


def test_flexdit_conversion_bf16():
    from mmaccel.diffusion import FlexDiTConfig, convert_to_flexdit

    dense_model = _dit(sample_size=16)
    config = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=1,
                           sparse_grid=(4, 4))  # fmt: skip
    flex = convert_to_flexdit(dense_model, config).to("cuda", BF16).eval()
    inputs = _dit_inputs(16)
    with torch.no_grad():
        out = flex(**inputs)
        out = getattr(out, "sample", out[0] if isinstance(out, tuple) else out)
        ref = dense_model(**inputs).sample
    assert out.shape == ref.shape and out.dtype == BF16 and torch.isfinite(out).all()


def test_svg2_flex_attention_compiled_matches_dense():
    """With every cluster pair kept, SVG2 through compiled flex_attention on CUDA equals SDPA."""
    from mmaccel.sparse_attn import (
        SparseAttentionState,
        SVG2Config,
        flex_attention_available,
        semantic_sparse_attention,
    )

    if not flex_attention_available():
        pytest.fail("flex_attention must be available on CUDA")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2048, 64, generator=g).to("cuda", BF16) for _ in range(3))
    full = SVG2Config(num_q_clusters=16, num_k_clusters=32, top_p=1.0, min_kc_ratio=1.0, backend="flex",
                      kmeans_init_iters=5)  # fmt: skip
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, full, state)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert state.last.backend == "flex" and _rel(out, ref) < 0.02
    sparse = SVG2Config(num_q_clusters=16, num_k_clusters=32, top_p=0.5, min_kc_ratio=0.1, backend="flex",
                        kmeans_init_iters=5)  # fmt: skip
    out = semantic_sparse_attention(q, k, v, sparse, SparseAttentionState())
    assert torch.isfinite(out).all()


def test_svg2_wan_bf16_flex_backend():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmaccel.sparse_attn import SVG2Config, apply_svg2
    from mmaccel.testing import tiny_wan_pipeline

    model = tiny_wan_pipeline(device="cuda", dtype=BF16).transformer
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 40, 52, generator=g).to("cuda", BF16)  # 2 x 20 x 26 = 1,040 tokens: flex
    text = torch.randn(1, 8, 32, generator=g).to("cuda", BF16)
    t = scheduler.timesteps[-1].reshape(1).to("cuda")
    config = SVG2Config(num_q_clusters=32, num_k_clusters=64, dense_layers=0.0)
    with torch.no_grad():
        dense = model(latents, t, text, return_dict=False)[0]
        with apply_svg2(model, config, scheduler=scheduler) as handle:
            out = model(latents, t, text, return_dict=False)[0]
            summary = handle.stats.summary()
    assert summary["flex_calls"] == summary["calls"] == 4, summary
    assert 0 < summary["sparse_density"] < 1 and torch.isfinite(out).all() and _rel(out, dense) < 0.5


@pytest.mark.parametrize("backend", ["flash", "_native_flash"])
def test_diffusers_flash_backend_matches_native(backend):
    """``set_attention_backend`` on CUDA: the flash kernels agree with the native SDPA path."""
    model, inputs = _dit(), _dit_inputs()
    with torch.no_grad():
        model.set_attention_backend("native")
        ref = model(**inputs).sample
        try:
            model.set_attention_backend(backend)
        except Exception as exc:  # "flash" needs the flash-attn package
            pytest.skip(f"attention backend {backend!r} not available here: {type(exc).__name__}: {exc}")
        out = model(**inputs).sample
    assert _rel(out, ref) < 0.02


def test_nar_and_raster_decode_on_cuda():
    from mmaccel.tokenizers_img import GPT, GPTConfig, SamplingConfig, generate_nar, generate_raster

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, dim=128, n_layer=2, n_head=4, num_classes=10)).to("cuda").eval()
    cond = torch.tensor([1, 2], device="cuda")
    greedy = SamplingConfig(greedy=True)
    with torch.no_grad():
        nar = generate_nar(model, cond, (8, 8), greedy)
        nar_nocache = generate_nar(model, cond, (8, 8), greedy, use_cache=False)
        raster = generate_raster(model, cond, (8, 8), greedy)
        model.to(BF16)
        nar_bf16 = generate_nar(model, cond, (8, 8), greedy)
    assert nar.tokens.shape == raster.tokens.shape == (2, 8, 8) and nar.tokens.device.type == "cuda"
    assert (nar.tokens == nar_nocache.tokens).float().mean() > 0.95  # fp32 TF32-free rounding may flip a tie
    assert nar.forward_passes < raster.forward_passes and nar_bf16.tokens.shape == (2, 8, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_clip_workers(world: int, tmp_path: Path) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2])
def test_clip_parallel_nccl(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
    results = _run_clip_workers(world, tmp_path)
    assert all(r["backend"] == "nccl" and r["world"] == world and r["finite"] for r in results), results
    assert results[0]["frames"] == CLIP_RUN["frames"], results[0]


def _clip_worker(out_dir: Path) -> None:
    """torchrun worker: an NCCL group (also at world size 1), then generate_long_video in bf16."""
    import torch.distributed as dist

    from mmaccel.parallel_video import ClipParallelConfig, LongVideoConfig, generate_long_video
    from mmaccel.runtime.distributed import init_distributed
    from mmaccel.testing import tiny_wan_pipeline

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))  # world size 1 too: NCCL runs
    ctx = init_distributed()
    pipe = tiny_wan_pipeline(device=ctx.device, dtype=BF16)
    r = CLIP_RUN
    config = LongVideoConfig(prompt="a red car on a street", num_frames=r["frames"], num_inference_steps=r["steps"],
                             height=r["height"], width=r["width"], seed=r["seed"], max_sequence_length=32,
                             clip=ClipParallelConfig(padding=r["padding"], global_frames=r["global_frames"],
                                                     phase_bias=r["phase_bias"]))  # fmt: skip
    with ctx.guard():
        out = generate_long_video(pipe, config, ctx, progress=False)
    frames = out.frames  # (F, H, W, 3) on rank 0, None on the others
    result = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend,
              "frames": -1 if frames is None else int(frames.shape[0]),
              "finite": bool(frames is None or torch.isfinite(torch.as_tensor(frames)).all()),
              "peak_mib": torch.cuda.max_memory_allocated() / 2**20}  # fmt: skip
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _clip_worker(Path(sys.argv[1]))
