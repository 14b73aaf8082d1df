"""Wan 2.2: two-expert A14B pipelines (T2V, I2V) and TI2V-5B, with SVG2, token density and clip
parallelism applied to the pipeline (every transformer it holds, one handle)."""

from __future__ import annotations

import pytest
import torch

from mmaccel.diffusion import TokenDensityConfig, TokenDensityHandle, apply_token_density
from mmaccel.parallel_video import ClipParallelConfig, ClipParallelHandle, apply_clip_parallel
from mmaccel.runtime.budget import ConstantSchedule
from mmaccel.runtime.distributed import DistContext
from mmaccel.runtime.pipelines import (
    PipelineStats,
    boundary_timestep,
    expert_for,
    is_pipeline,
    pipeline_transformers,
)
from mmaccel.sparse_attn import SVG2Config, SVG2Handle, apply_svg2
from mmaccel.testing import (
    check_technique_contract,
    tiny_image,
    tiny_wan22_pipeline,
    tiny_wan22_ti2v_pipeline,
    tiny_wan_pipeline,
)

SVG2_FULL = SVG2Config(num_q_clusters=6, num_k_clusters=9, top_p=1.0, min_kc_ratio=1.0, dense_steps=0.0,
                       dense_layers=0.0, kmeans_init_iters=3)  # fmt: skip


def _call(pipe, **kw):
    """Latents of a 4-step CFG run (both experts: 999, 900 high noise; 750, 500 low noise)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    kwargs = dict(height=64, width=96, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                  output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    kwargs.update(kw)
    # WanImageToVideoPipeline cleans prompts with ftfy unconditionally (diffusers 0.42): embed here
    embed = WanPipeline._get_t5_prompt_embeds
    kwargs["prompt_embeds"] = embed(pipe, prompt="a red car on a street", max_sequence_length=32)
    kwargs["negative_prompt_embeds"] = embed(pipe, prompt="", max_sequence_length=32)
    if isinstance(pipe, WanImageToVideoPipeline):
        kwargs["image"] = tiny_image(kwargs["height"], kwargs["width"])
    with torch.no_grad():
        return pipe(**kwargs).frames


@pytest.fixture(scope="module")
def t2v():
    return tiny_wan22_pipeline()


def test_pipeline_helpers(t2v):
    assert is_pipeline(t2v) and not is_pipeline(t2v.transformer)
    experts = pipeline_transformers(t2v)
    assert list(experts) == ["transformer", "transformer_2"]
    assert experts["transformer"] is not experts["transformer_2"]
    assert boundary_timestep(t2v) == 875.0
    assert expert_for(t2v, 900.0) == "transformer" and expert_for(t2v, 875.0) == "transformer"
    assert expert_for(t2v, 874.0) == "transformer_2"
    one = tiny_wan_pipeline()
    assert list(pipeline_transformers(one)) == ["transformer"] and boundary_timestep(one) is None
    with pytest.raises(ValueError, match="holds no transformer"):
        pipeline_transformers(object())


def _both_experts_ran(summary: dict, key: str) -> None:
    assert summary[f"transformer/{key}"] > 0 and summary[f"transformer_2/{key}"] > 0


def test_svg2_contract_on_both_experts():
    pipe = tiny_wan22_pipeline()
    # 2 x 20 x 25 = 1,000 video tokens: the reference defaults (1,000 key clusters) apply
    run = lambda: _call(pipe, height=320, width=400, num_frames=5, num_inference_steps=5, guidance_scale=1.0)  # noqa: E731
    summary = check_technique_contract(SVG2Config, apply_svg2, SVG2Handle, pipe.transformer, run, target=pipe)
    # 5 steps: floor(0.2 * 5) = 1 dense step (the high-noise expert's first), the rest sparse
    assert summary["transformer/calls"] == 2 * 4 and summary["transformer/dense_calls"] == 4
    assert summary["transformer_2/calls"] == 3 * 4 and summary["transformer_2/sparse_calls"] == 3 * 4
    assert 0 < summary["transformer_2/sparse_density"] < 1


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_svg2_full_budget_equals_dense_on_both_experts(task):
    pipe = tiny_wan22_pipeline(task=task)
    dense = _call(pipe)
    with apply_svg2(pipe, SVG2_FULL) as handle:
        sparse = _call(pipe)
        summary = handle.stats.summary()
    _both_experts_ran(summary, "sparse_calls")
    assert summary["transformer/sparse_calls"] == 2 * 2 * 4  # 2 steps x CFG x 4 blocks
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_call(pipe), dense, rtol=0, atol=0)


def test_token_density_contract_and_full_budget_on_both_experts(t2v):
    run = lambda: _call(t2v, height=64, width=96, num_frames=9)  # noqa: E731
    summary = check_technique_contract(
        TokenDensityConfig, apply_token_density, TokenDensityHandle, t2v.transformer, run, target=t2v
    )
    # 8 forwards, 4 per expert; the default schedule reduces below progress 0.8 (t > 200): all of them
    assert summary["transformer/forwards"] == 4 and summary["transformer_2/forwards"] == 4
    _both_experts_ran(summary, "reduced_forwards")
    dense = run()
    with apply_token_density(t2v, TokenDensityConfig(schedule=ConstantSchedule(1.0))) as handle:
        torch.testing.assert_close(run(), dense, rtol=0, atol=0)
        assert isinstance(handle.stats, PipelineStats) and handle.stats.summary()["transformer_2/token_ratio"] == 1.0
    reduced = TokenDensityConfig(factor=(2, 2), schedule=ConstantSchedule(0.25))
    with apply_token_density(t2v, reduced):
        assert (run() - dense).abs().max() > 1e-3  # a reduced run differs


def test_token_density_i2v_full_budget_and_one_transformer_pipelines():
    i2v = tiny_wan22_pipeline(task="i2v")
    dense = _call(i2v)
    with apply_token_density(i2v, TokenDensityConfig(schedule=ConstantSchedule(1.0))) as handle:
        torch.testing.assert_close(_call(i2v), dense, rtol=0, atol=0)
        _both_experts_ran(handle.stats.summary(), "forwards")
    with apply_token_density(i2v, TokenDensityConfig(schedule=ConstantSchedule(0.25))) as handle:
        assert (_call(i2v) - dense).abs().max() > 1e-3
        _both_experts_ran(handle.stats.summary(), "reduced_forwards")
    one = tiny_wan_pipeline()  # Wan 2.1: one transformer, the summary is its own (no prefixes)
    with apply_token_density(one) as handle:
        _call(one)
        assert list(handle.experts) == ["transformer"] and handle.stats.summary()["forwards"] == 4 * 2


def test_clip_parallel_contract_and_dense_options_on_both_experts(t2v):
    ctx = DistContext.single()
    run = lambda: _call(t2v)  # noqa: E731
    summary = check_technique_contract(
        ClipParallelConfig, apply_clip_parallel, ClipParallelHandle, t2v.transformer, run, target=t2v,
        ctx=ctx, num_latent_frames=3,
    )  # fmt: skip
    assert summary["transformer/calls"] == 4 * 4 and summary["transformer_2/calls"] == 4 * 4
    dense = run()
    config = ClipParallelConfig(padding=1, global_frames=1, local_scope="window", end_keys="none",
                                global_sampling="uniform")  # fmt: skip
    with apply_clip_parallel(t2v, config, ctx=ctx, num_latent_frames=3):
        torch.testing.assert_close(run(), dense, rtol=1e-4, atol=1e-4)


def test_one_handle_restores_both_and_refuses_a_second_apply(t2v):
    before = {(attr, k): v.clone() for attr in ("transformer", "transformer_2")
              for k, v in getattr(t2v, attr).state_dict().items()}  # fmt: skip
    processors = [b.attn1.processor for attr in ("transformer", "transformer_2") for b in getattr(t2v, attr).blocks]
    handle = apply_svg2(t2v, SVG2_FULL)
    assert all(b.attn1.processor is not p for b, p in zip(
        [b for attr in ("transformer", "transformer_2") for b in getattr(t2v, attr).blocks], processors))  # fmt: skip
    with pytest.raises(ValueError, match="already applied"):
        apply_svg2(t2v, SVG2_FULL)
    with pytest.raises(ValueError, match="already applied"):
        apply_svg2(t2v.transformer_2, SVG2_FULL)  # the expert itself is patched too
    handle.remove()
    after = [b.attn1.processor for attr in ("transformer", "transformer_2") for b in getattr(t2v, attr).blocks]
    assert all(a is b for a, b in zip(after, processors))
    assert "_mmaccel_patches" not in t2v.__dict__ and "_mmaccel_patches" not in t2v.transformer_2.__dict__
    for attr in ("transformer", "transformer_2"):
        for k, v in getattr(t2v, attr).state_dict().items():
            assert torch.equal(v, before[attr, k])


def test_a_failure_part_way_removes_the_first_expert(t2v):
    attn = t2v.transformer_2.blocks[0].attn1
    attn.add_k_proj = torch.nn.Linear(1, 1)  # image-conditioning (I2V) projections: refused by the Wan adapter
    try:
        with pytest.raises(NotImplementedError, match="image-conditioning"):
            apply_svg2(t2v, SVG2_FULL)
        assert "_mmaccel_patches" not in t2v.transformer.__dict__ and "_mmaccel_patches" not in t2v.__dict__
    finally:
        attn.add_k_proj = None


@pytest.fixture(scope="module")
def ti2v():
    return tiny_wan22_ti2v_pipeline()


def test_ti2v_svg2_full_budget_and_token_density_pooled(ti2v):
    kw = dict(height=128, width=192, num_inference_steps=2)
    dense = _call(ti2v, **kw)
    assert ti2v.transformer.config.in_channels == 48 and ti2v.config.expand_timesteps
    with apply_svg2(ti2v, SVG2_FULL) as handle:  # per-token timesteps: read from the pipeline
        torch.testing.assert_close(_call(ti2v, **kw), dense, rtol=1e-4, atol=1e-4)
        assert handle.stats.summary()["sparse_calls"] == 2 * 2 * 4
    pooled = TokenDensityConfig(pooled_blocks=(0, 2), sparse_blocks=None, schedule=ConstantSchedule(0.25))
    with apply_token_density(ti2v, pooled) as handle:  # per-token modulation pooled with the tokens
        out = _call(ti2v, **kw)
        assert handle.stats.summary()["reduced_forwards"] == 4
    assert out.shape == dense.shape and (out - dense).abs().max() > 1e-4
    with apply_token_density(ti2v, TokenDensityConfig(schedule=ConstantSchedule(0.25))) as handle:
        sparse = _call(ti2v, **kw)  # default sparse_q blocks: dense keys/values modulated per token
        assert handle.stats.summary()["reduced_forwards"] == 4
    assert sparse.shape == dense.shape and torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-4
