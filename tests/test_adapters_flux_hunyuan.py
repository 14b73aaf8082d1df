"""Adapters for HunyuanVideo and Flux on tiny random models of the real classes: the adapter's
attention pieces reproduce diffusers' processors, and token density (pooled blocks) follows the
contract, equals the model at full budget and reduces the image/video tokens of every stream."""

from __future__ import annotations

import pytest
import torch

from mmaccel.diffusion import TokenDensityConfig, TokenDensityHandle, apply_token_density
from mmaccel.runtime.adapters import family_of, flux, hunyuan_video
from mmaccel.runtime.budget import ConstantSchedule
from mmaccel.testing import (
    check_technique_contract,
    tiny_flux_inputs,
    tiny_flux_transformer,
    tiny_hunyuan_video_inputs,
    tiny_hunyuan_video_transformer,
)


@pytest.fixture(scope="module")
def hv():
    return tiny_hunyuan_video_transformer()


@pytest.fixture(scope="module")
def fx():
    return tiny_flux_transformer()


def _runner(model, inputs):
    def run():
        with torch.no_grad():
            return model(**inputs)[0]

    return run


def test_families_and_block_stacks(hv, fx):
    assert family_of(hv) == "hunyuan_video" and family_of(fx) == "flux"
    assert len(hunyuan_video.blocks(hv)) == 4 and len(flux.blocks(fx)) == 4
    assert hunyuan_video.token_grid(hv, torch.zeros(1, 16, 3, 8, 12)) == (3, 4, 6)
    inputs = tiny_flux_inputs(fx, rows=4, cols=6)
    assert flux.token_grid(fx, inputs["hidden_states"], inputs["img_ids"]) == (1, 4, 6)
    with pytest.raises(ValueError, match="raster-order img_ids"):
        flux.token_grid(fx, inputs["hidden_states"][:, :20], inputs["img_ids"])


def test_hunyuan_adapter_reproduces_the_processor_in_both_block_kinds(hv):
    """project_qkv -> attention (with the transformer's key mask) -> project_out, in place of
    diffusers' HunyuanVideoAttnProcessor2_0 in every block, gives the same output bit for bit."""

    class AdapterProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):  # fmt: skip
            q, k, v = hunyuan_video.project_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            out = hunyuan_video.attention(attn, q, k, v, attention_mask)
            return hunyuan_video.project_out(attn, out, encoder_hidden_states.shape[1])

    inputs = tiny_hunyuan_video_inputs(hv, valid_text=5)  # 3 padded text tokens: the mask matters
    run = _runner(hv, inputs)
    dense = run()
    originals = [b.attn.processor for b in hunyuan_video.blocks(hv)]
    for block in hunyuan_video.blocks(hv):
        block.attn.set_processor(AdapterProcessor())
    try:
        torch.testing.assert_close(run(), dense, rtol=0, atol=0)
    finally:
        for block, proc in zip(hunyuan_video.blocks(hv), originals):
            block.attn.set_processor(proc)


@pytest.mark.parametrize("family", ["hunyuan_video", "flux"])
def test_token_density_contract_and_full_budget(family, hv, fx):
    if family == "flux":
        model, inputs = fx, tiny_flux_inputs(fx, timestep=0.5)
    else:
        model, inputs = hv, tiny_hunyuan_video_inputs(hv, valid_text=5)
    run = _runner(model, inputs)
    config = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None)  # dual + first single-stream block
    if family == "flux":  # Flux's timestep is in [0, 1]: progress from num_train_timesteps=1
        config = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, num_train_timesteps=1)

    def apply(model, cfg, **kw):
        return apply_token_density(model, config if cfg is None else cfg, **kw)

    summary = check_technique_contract(TokenDensityConfig, apply, TokenDensityHandle, model, run)
    assert summary["forwards"] == 1 and summary["reduced_forwards"] == 1
    assert summary["token_ratio"] == pytest.approx((3 * 0.25 + 1) / 4)  # 2x2 pooling in 3 of 4 blocks
    dense = run()
    full = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, schedule=ConstantSchedule(1.0),
                              num_train_timesteps=config.num_train_timesteps)  # fmt: skip
    with apply_token_density(model, full):
        torch.testing.assert_close(run(), dense, rtol=0, atol=0)
    # the reduced run: every pooled block's attention sees the pooled image tokens plus all text
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
             for b in (hunyuan_video if family == "hunyuan_video" else flux).blocks(model)]  # fmt: skip
    try:
        with apply_token_density(model, config):
            reduced = run()
    finally:
        for h in hooks:
            h.remove()
    n, text = 72 if family == "hunyuan_video" else 96, 8
    single = n + text if family == "flux" else n  # Flux's single blocks attend over [text; image] in one input
    assert seen[:2] == [n // 4] * 2 and seen[2] == (single - n + n // 4) and seen[3] == single
    assert reduced.shape == dense.shape and torch.isfinite(reduced).all()
    assert (reduced - dense).abs().max() > 1e-3


def test_token_density_refuses_what_it_does_not_implement(fx):
    with pytest.raises(NotImplementedError, match="sparse blocks are not implemented"):
        apply_token_density(fx, TokenDensityConfig(pooled_blocks=(0, 1), sparse_blocks=(1, 3)))
    with pytest.raises(ValueError, match="image model"):
        apply_token_density(fx, TokenDensityConfig(factor=(2, 2, 2), pooled_blocks=(0, 1), sparse_blocks=None))


# ---------------------------------------------------------------- SVG2 on HunyuanVideo

SVG2_FULL = dict(num_q_clusters=6, num_k_clusters=9, top_p=1.0, min_kc_ratio=1.0, dense_steps=0.0,
                 dense_layers=0.0, kmeans_init_iters=3)  # fmt: skip


def test_svg2_hunyuan_preset_is_the_authors_settings():
    from mmaccel.sparse_attn import SVG2Config

    preset = SVG2Config.preset("hunyuanvideo-720p")
    assert (preset.num_q_clusters, preset.num_k_clusters, preset.top_p, preset.min_kc_ratio) == (400, 1000, 0.9, 0.1)
    assert (preset.kmeans_init_iters, preset.kmeans_iters, preset.dense_steps, preset.dense_layers) == (50, 2, 0.1, 0.03)
    assert SVG2Config.preset("hunyuanvideo-720p", top_p=0.8).top_p == 0.8


@pytest.mark.parametrize("valid_text", [8, 5], ids=["no-padding", "padded-text"])
def test_svg2_hunyuan_full_budget_equals_dense(hv, valid_text):
    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    run = _runner(hv, tiny_hunyuan_video_inputs(hv, valid_text=valid_text))
    dense = run()
    with apply_svg2(hv, SVG2Config(**SVG2_FULL)) as handle:
        sparse = run()
        summary = handle.stats.summary()
    assert summary["sparse_calls"] == 4 and summary["dense_calls"] == 0  # dual- and single-stream blocks
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(), dense, rtol=0, atol=0)


def test_svg2_hunyuan_padded_text_keys_stay_masked(hv):
    """With padding, attending to the padded text keys would change the output: the mask is kept."""
    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    inputs = tiny_hunyuan_video_inputs(hv, valid_text=5)
    padded_visible = dict(inputs, encoder_attention_mask=torch.ones_like(inputs["encoder_attention_mask"]))
    with apply_svg2(hv, SVG2Config(**SVG2_FULL)):
        masked, visible = _runner(hv, inputs)(), _runner(hv, padded_visible)()
    assert (masked - visible).abs().max() > 1e-3


def test_svg2_contract_hunyuan_video(hv):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmaccel.sparse_attn import SVG2Config, SVG2Handle, apply_svg2

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(5)  # floor(0.2 * 5) = 1 dense step: the last step is sparse
    inputs = tiny_hunyuan_video_inputs(hv, shape=(2, 40, 50), valid_text=5, timestep=float(scheduler.timesteps[-1]))
    run = _runner(hv, inputs)  # 2 x 20 x 25 = 1,000 video tokens: the reference's 1,000 key clusters
    summary = check_technique_contract(SVG2Config, apply_svg2, SVG2Handle, hv, run, scheduler=scheduler)
    assert summary["calls"] == 4 and summary["sparse_calls"] == 4
    assert 0 < summary["sparse_density"] < 1


# ---------------------------------------------------------------- host-device syncs


@pytest.mark.parametrize("family", ["hunyuan_video", "flux"])
def test_token_density_steady_state_has_no_sync(family, hv, fx):
    """After the first forward (Flux reads its grid from img_ids once), a reduced forward reads
    nothing back from the device."""
    from mmaccel.testing import HotPathCounter

    model, inputs = (fx, tiny_flux_inputs(fx)) if family == "flux" else (hv, tiny_hunyuan_video_inputs(hv, valid_text=5))
    config = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, schedule=ConstantSchedule(0.25))
    with apply_token_density(model, config, current_timestep_callback=lambda: 500.0) as handle, torch.no_grad():
        model(**inputs)
        with HotPathCounter() as count:
            model(**inputs)
        assert handle.stats.summary()["reduced_forwards"] == 2
    assert count.syncs == 0, count.sync_counts


def test_svg2_hunyuan_masked_prefix_adds_no_sync(hv):
    """The padded-text cluster is built on the device: an SVG2 call on HunyuanVideo (joint attention,
    masked text prefix) reads back from the device no more often than one on Wan (no prefix)."""
    from mmaccel.sparse_attn import SVG2Config, apply_svg2
    from mmaccel.testing import HotPathCounter, tiny_wan_pipeline

    config = SVG2Config(**SVG2_FULL)
    wan = tiny_wan_pipeline().transformer
    g = torch.Generator().manual_seed(0)
    wan_inputs = (torch.randn(1, 16, 3, 8, 12, generator=g), torch.tensor([500.0]), torch.randn(1, 8, 32, generator=g))
    counts = {}
    for name, model, run in (("hunyuan", hv, lambda: hv(**tiny_hunyuan_video_inputs(hv, valid_text=5))),
                             ("wan", wan, lambda: wan(*wan_inputs))):  # fmt: skip
        with apply_svg2(model, config, current_timestep_callback=lambda: 500.0) as handle, torch.no_grad():
            run()
            with HotPathCounter() as count:
                run()
            counts[name] = count.syncs / (handle.stats.summary()["sparse_calls"] / 2)
    assert counts["hunyuan"] == counts["wan"], counts


@pytest.mark.parametrize("family", ["flux", pytest.param("hunyuan_video", marks=pytest.mark.slow)])
def test_token_density_compiles_without_graph_breaks(family, hv, fx):
    """The host-side part (timestep, plan, Flux's grid) runs before the first tensor op: a reduced
    forward is one graph, and a second step at the same setting does not recompile."""
    from mmaccel.testing import compile_counts

    model, inputs = (fx, tiny_flux_inputs(fx)) if family == "flux" else (hv, tiny_hunyuan_video_inputs(hv, valid_text=5))
    config = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, schedule=ConstantSchedule(0.25))
    with apply_token_density(model, config, current_timestep_callback=lambda: 500.0):
        counts = compile_counts(model, [((), inputs), ((), inputs)])
    assert counts.graph_breaks == 0, counts.break_reasons
    assert counts.compiles == 1


def test_token_density_on_hunyuan_token_replace_pools_within_frames_and_svg2_runs_there():
    """Image-to-video token-replace blocks give the first ``num_tokens`` video tokens (the first
    latent frame) their own modulation: token density pools within frames and hands the blocks the
    pooled first frame's count; pooling across frames or merging is refused. SVG2 keeps the token
    count and runs (full budget = dense)."""
    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    i2v = tiny_hunyuan_video_transformer(image_condition_type="token_replace")
    inputs = tiny_hunyuan_video_inputs(i2v, valid_text=5)
    grid = hunyuan_video.token_grid(i2v, inputs["hidden_states"])
    for bad in (dict(factor=(2, 2, 2)), dict(reducer="merge")):
        with pytest.raises(NotImplementedError, match="token_replace"):
            apply_token_density(i2v, TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, **bad))
    run = _runner(i2v, inputs)
    dense = run()
    seen = []  # the first-frame token count each token-replace block's norm gets, in block order

    def record(module, args):
        seen.append(args[3])

    blocks = hunyuan_video.blocks(i2v)
    hooks = [getattr(b, "norm1", None) or b.norm for b in blocks]
    hooks = [norm.register_forward_pre_hook(record) for norm in hooks]
    frame = grid[1] * grid[2]
    for keep, window in ((1.0, 1), (0.25, 4)):
        seen.clear()
        config = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, schedule=ConstantSchedule(keep))
        with apply_token_density(i2v, config, current_timestep_callback=lambda: 500.0):
            out = run()
        assert seen == [frame // window] * 3 + [frame] * (len(blocks) - 3)
        if keep == 1.0:
            torch.testing.assert_close(out, dense)
        else:
            assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    for h in hooks:
        h.remove()
    run = _runner(i2v, tiny_hunyuan_video_inputs(i2v, valid_text=5))
    dense = run()
    with apply_svg2(i2v, SVG2Config(**SVG2_FULL)):
        torch.testing.assert_close(run(), dense, rtol=1e-4, atol=1e-4)
