"""SVG2 processors on diffusers' WanTransformer3DModel / WanPipeline (tiny, random weights)."""

from __future__ import annotations

import pytest
import torch

from mmaccel.sparse_attn import SVG2Config, SVG2WanAttnProcessor, apply_sparse_attention, pipeline_progress
from mmaccel.testing import call_kwargs, tiny_wan_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 8, 12, generator=g)  # 3 x 4 x 6 = 72 video tokens
    text = torch.randn(1, 8, 32, generator=g)
    return latents, torch.tensor([500.0]), text


def _forward(model, latents, t, text):
    with torch.no_grad():
        return model(latents, t, text, return_dict=False)[0]


def test_full_budget_matches_dense_and_remove_restores(pipe):
    model = pipe.transformer
    originals = [b.attn1.processor for b in model.blocks]
    cross = [b.attn2.processor for b in model.blocks]
    x = _inputs()
    dense = _forward(model, *x)
    cfg = SVG2Config(num_q_clusters=6, num_k_clusters=9, top_p=1.0, min_kc_ratio=1.0, dense_steps=0.0,
                     dense_layers=0.0, backend="masked")  # fmt: skip
    handle = apply_sparse_attention(model, cfg)
    assert all(isinstance(b.attn1.processor, SVG2WanAttnProcessor) for b in model.blocks)
    assert [b.attn2.processor for b in model.blocks] == cross  # cross-attention stays dense
    torch.testing.assert_close(_forward(model, *x), dense, atol=1e-4, rtol=1e-4)
    summary = handle.stats.summary()
    assert summary["sparse_calls"] == len(model.blocks) and summary["sparse_density"] == 1.0
    with pytest.raises(ValueError, match="already applied"):
        apply_sparse_attention(model, cfg)
    handle.remove()
    assert all(b.attn1.processor is p for b, p in zip(model.blocks, originals))
    assert torch.equal(_forward(model, *x), dense)


def test_dense_layers_are_bit_identical(pipe):
    model = pipe.transformer
    x = _inputs(1)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=1.0, backend="masked")  # fmt: skip
    dense = _forward(model, *x)
    with apply_sparse_attention(model, cfg) as handle:
        assert torch.equal(_forward(model, *x), dense)
        assert handle.stats.summary()["backends"] == ["dense"]
        cfg_half = SVG2Config(**{**cfg.__dict__, "dense_layers": 0.5})
    with apply_sparse_attention(model, cfg_half) as handle:
        out = _forward(model, *x)
        layers = {r["layer"]: r["backend"] for r in handle.stats.records}
    assert layers == {0: "dense", 1: "dense", 2: "masked", 3: "masked"}
    assert not torch.equal(out, dense)


def test_apply_errors(pipe):
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_sparse_attention(torch.nn.Linear(2, 2), SVG2Config())
    with pytest.raises(ValueError, match="timestep_callback"):
        apply_sparse_attention(pipe.transformer, SVG2Config(dense_steps=0.2))
    with pytest.raises(TypeError, match="SVG2Config"):
        apply_sparse_attention(pipe.transformer, {"top_p": 0.9})


def test_wan_pipeline_end_to_end_dense_warmup_bit_identical(pipe):
    """3 steps, dense_steps=0.4: steps 0 and 1 (progress 0, 1/3) dense, step 2 sparse."""

    def run():
        latents = []

        def grab(p, i, t, kw):
            latents.append(kw["latents"].clone())
            return kw

        kwargs = call_kwargs("wan") | dict(num_inference_steps=3, output_type="latent")
        out = pipe(**kwargs, callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"]).frames
        return latents, out

    dense_steps, _ = run()
    cfg = SVG2Config(num_q_clusters=8, num_k_clusters=12, top_p=0.9, min_kc_ratio=0.1, dense_steps=0.4,
                     dense_layers=0.0, backend="auto")  # fmt: skip
    with apply_sparse_attention(pipe.transformer, cfg, pipeline_progress(pipe)) as handle:
        sparse_steps, out = run()
        records = list(handle.stats.records)
    assert torch.equal(sparse_steps[0], dense_steps[0]) and torch.equal(sparse_steps[1], dense_steps[1])
    assert not torch.equal(sparse_steps[2], dense_steps[2])
    assert torch.isfinite(out).all()
    # 3 steps x 2 CFG passes x 4 layers; the last step's 8 calls sparse on the small-size backend
    assert len(records) == 24
    assert [r["backend"] for r in records[16:]] == ["masked"] * 8
    assert all(r["backend"] == "dense" for r in records[:16])
    assert all(0 < r["density"] <= 1 for r in records)
    # the uncond pass warm-starts from the cond pass's centroids (CFG passes share state)
    assert [r["warm_start"] for r in records[16:]] == [False] * 4 + [True] * 4


def test_cogvideox_joint_attention():
    from mmaccel.testing import tiny_cogvideox_pipeline

    model = tiny_cogvideox_pipeline().transformer
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 3, 4, 8, 12, generator=g), torch.randn(1, 32, 32, generator=g), torch.tensor([500]))
    with torch.no_grad():
        dense = model(hidden_states=x[0], encoder_hidden_states=x[1], timestep=x[2], return_dict=False)[0]

    def run():
        with torch.no_grad():
            return model(hidden_states=x[0], encoder_hidden_states=x[1], timestep=x[2], return_dict=False)[0]

    full = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=1.0, min_kc_ratio=1.0, dense_steps=0.0,
                      dense_layers=0.0, backend="masked")  # fmt: skip
    with apply_sparse_attention(model, full) as handle:
        torch.testing.assert_close(run(), dense, atol=1e-4, rtol=1e-4)
        assert handle.stats.summary()["sparse_calls"] == 4
    sparse = SVG2Config(**{**full.__dict__, "top_p": 0.3, "min_kc_ratio": 0.0, "dense_layers": 0.5})
    with apply_sparse_attention(model, sparse) as handle:
        out = run()
        assert [r["backend"] for r in handle.stats.records] == ["dense", "dense", "masked", "masked"]
        assert all(r["density"] < 1 for r in handle.stats.records[2:])
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert torch.equal(run(), dense)  # removed: bit-identical again
