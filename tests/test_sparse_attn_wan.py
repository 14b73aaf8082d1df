"""SVG2 processors on diffusers' WanTransformer3DModel / WanPipeline (tiny, random weights)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from mmaccel.sparse_attn import SVG2Config, SVG2Handle, SVG2WanAttnProcessor, apply_svg2
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
    handle = apply_svg2(model, cfg)
    assert type(handle) is SVG2Handle
    assert all(isinstance(b.attn1.processor, SVG2WanAttnProcessor) for b in model.blocks)
    assert [b.attn2.processor for b in model.blocks] == cross  # cross-attention stays dense
    torch.testing.assert_close(_forward(model, *x), dense, atol=1e-4, rtol=1e-4)
    summary = handle.stats.summary()
    assert summary["sparse_calls"] == len(model.blocks) and summary["sparse_density"] == 1.0
    model.set_attention_backend("native")  # reaches our processors (the dense and text paths use it)
    assert all(b.attn1.processor._attention_backend.value == "native" for b in model.blocks)
    with pytest.raises(ValueError, match="already applied"):
        apply_svg2(model, cfg)
    handle.remove()
    assert all(b.attn1.processor is p for b, p in zip(model.blocks, originals))
    assert torch.equal(_forward(model, *x), dense)


def test_dense_layers_are_bit_identical(pipe):
    model = pipe.transformer
    x = _inputs(1)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=1.0, backend="masked", profile=True)  # fmt: skip
    dense = _forward(model, *x)
    with apply_svg2(model, cfg) as handle:
        assert torch.equal(_forward(model, *x), dense)
        summary = handle.stats.summary()
        assert summary["dense_calls"] == summary["calls"] == len(model.blocks) and summary["sparse_calls"] == 0
        cfg_half = SVG2Config(**{**cfg.__dict__, "dense_layers": 0.5})
    with apply_svg2(model, cfg_half) as handle:
        out = _forward(model, *x)
        layers = {r["layer"]: r["backend"] for r in handle.stats.records}
    assert layers == {0: "dense", 1: "dense", 2: "masked", 3: "masked"}
    assert not torch.equal(out, dense)


def test_apply_errors(pipe):
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_svg2(torch.nn.Linear(2, 2), SVG2Config())
    with pytest.raises(ValueError, match="scheduler"):
        apply_svg2(pipe.transformer, SVG2Config(dense_steps=0.2))
    with pytest.raises(TypeError, match="current_timestep_callback"):
        apply_svg2(pipe.transformer, SVG2Config(dense_steps=0.0), 0.5)
    with pytest.raises(TypeError, match="scheduler"):
        apply_svg2(pipe.transformer, SVG2Config(), scheduler=object())
    with pytest.raises(TypeError, match="SVG2Config"):
        apply_svg2(pipe.transformer, {"top_p": 0.9})


def test_wan_pipeline_end_to_end_dense_warmup_bit_identical(pipe):
    """3 steps, dense_steps=0.7: floor(0.7 * 3) = 2 steps (0 and 1) dense, step 2 sparse."""

    def run():
        latents = []

        def grab(p, i, t, kw):
            latents.append(kw["latents"].clone())
            return kw

        kwargs = call_kwargs("wan") | dict(num_inference_steps=3, output_type="latent")
        out = pipe(**kwargs, callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"]).frames
        return latents, out

    dense_steps, _ = run()
    cfg = SVG2Config(num_q_clusters=8, num_k_clusters=12, top_p=0.9, min_kc_ratio=0.1, dense_steps=0.7,
                     dense_layers=0.0, backend="auto", profile=True)  # fmt: skip
    with apply_svg2(pipe.transformer, cfg, lambda: pipe.current_timestep, scheduler=pipe.scheduler) as handle:
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
    assert all(r["kmeans_s"] >= 0 for r in records[16:])  # profile=True: timings recorded


def test_records_and_timings_only_when_asked(pipe):
    """Without profile, the stats count calls and density on the device and keep no records."""
    model = pipe.transformer
    x = _inputs(1)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=0.5, backend="masked")  # fmt: skip
    with apply_svg2(model, cfg) as handle:
        _forward(model, *x)
        assert handle.stats.records == [] and handle.stats.kmeans_s == 0.0
        summary = handle.stats.summary()
        assert summary["dense_calls"] == 2 and summary["masked_calls"] == 2 and 0 < summary["sparse_density"] < 1
        assert handle.processors[-1].state.last.kmeans_s is None


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
    with apply_svg2(model, full) as handle:
        torch.testing.assert_close(run(), dense, atol=1e-4, rtol=1e-4)
        assert handle.stats.summary()["sparse_calls"] == 4
    sparse = SVG2Config(**{**full.__dict__, "top_p": 0.3, "min_kc_ratio": 0.0, "dense_layers": 0.5, "profile": True})
    with apply_svg2(model, sparse) as handle:
        out = run()
        assert [r["backend"] for r in handle.stats.records] == ["dense", "dense", "masked", "masked"]
        assert all(r["density"] < 1 for r in handle.stats.records[2:])
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert torch.equal(run(), dense)  # removed: bit-identical again
    # dense warm-up (our processor, attention through diffusers' dispatch) is bit-identical too
    with apply_svg2(model, SVG2Config(**{**full.__dict__, "dense_layers": 1.0})):
        assert torch.equal(run(), dense)


def test_timestep_validation(pipe):
    """The callback returns the scheduler's timestep; anything that is not one is an error."""
    model = pipe.transformer
    x = _inputs()
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.0, dense_layers=0.0, backend="masked")
    for bad in (float("nan"), -1, 5000, None):
        with apply_svg2(model, cfg, lambda bad=bad: bad):
            with pytest.raises(ValueError, match="current_timestep_callback"):
                _forward(model, *x)
    with apply_svg2(model, cfg):  # no callback: the forward's own timestep is validated
        with pytest.raises(ValueError, match="timestep argument"):
            _forward(model, x[0], torch.tensor([-5.0]), x[2])
    # step-counted warm-up: the timestep must be one of the scheduler's
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    warm = SVG2Config(**{**cfg.__dict__, "dense_steps": 0.4, "profile": True})  # floor(0.4 * 5) = 2 dense steps
    with apply_svg2(model, warm, scheduler=scheduler) as handle:
        with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
            _forward(model, x[0], torch.tensor([123.4]), x[2])
        for t in scheduler.timesteps:
            _forward(model, x[0], t.reshape(1), x[2])
        backends = [r["backend"] for r in handle.stats.records]
    assert backends == ["dense"] * 8 + ["masked"] * 12


def test_reference_rounding_of_defaults():
    """The reference floors: kept key clusters int(0.1 * Ck), dense layers floor(0.03 * L),
    dense steps floor(0.2 * steps)."""
    from mmaccel.sparse_attn import dense_layer_count, dense_step_count, min_kept_clusters, select_clusters

    cfg = SVG2Config()
    assert min_kept_clusters(cfg.min_kc_ratio, 128) == 12 and min_kept_clusters(cfg.min_kc_ratio, 16) == 1
    assert min_kept_clusters(cfg.min_kc_ratio, 1000) == 100 and min_kept_clusters(0.0, 16) == 1
    assert dense_layer_count(cfg.dense_layers, 30) == 0  # Wan 2.1 1.3B
    assert dense_layer_count(cfg.dense_layers, 40) == 1  # Wan 2.1 14B
    assert dense_step_count(cfg.dense_steps, 12) == 2 and dense_step_count(cfg.dense_steps, 50) == 10
    # the selection keeps exactly the floored minimum when top_p alone would keep one cluster
    g = torch.Generator().manual_seed(0)
    cq, ck = torch.randn(1, 3, 8, generator=g), torch.randn(1, 128, 8, generator=g)
    counts = torch.ones(1, 128, dtype=torch.long)
    sel = select_clusters(cq * 50, ck, counts, 1e-6, cfg.min_kc_ratio)
    assert sel.sum(-1).tolist() == [[12, 12, 12]]


def test_dense_warmup_layer_counts_on_deep_models():
    """A 30- and a 40-block Wan (tiny width) with the default dense_layers=0.03: 0 and 1 dense layers."""
    from diffusers import WanTransformer3DModel

    for depth, dense in ((30, 0), (40, 1)):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=8,
                                      in_channels=4, out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8,
                                      num_layers=depth, rope_max_seq_len=32).eval()  # fmt: skip
        with apply_svg2(model, SVG2Config(dense_steps=0.0)) as handle:
            assert [p.dense_layer for p in handle.processors] == [True] * dense + [False] * (depth - dense)


def test_steady_state_compiles_without_graph_breaks(pipe):
    """A warm-started sparse step traces as one graph (no .item(), timing or host decisions in it),
    reruns at a new timestep without recompiling, and equals the eager forward."""
    model = pipe.transformer
    latents, _, text = _inputs(3)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.0, dense_layers=0.0, backend="masked")
    with apply_svg2(model, cfg) as handle:
        _forward(model, latents, torch.tensor([700.0]), text)  # cold start: every layer is warm now
        torch._dynamo.reset()
        with torch.no_grad():
            explain = torch._dynamo.explain(model)(latents, torch.tensor([600.0]), text, return_dict=False)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons

        saved = [(p.state.q_centroids, p.state.k_centroids) for p in handle.processors]

        def restore():
            for p, (q, k) in zip(handle.processors, saved):
                p.state.q_centroids, p.state.k_centroids = q, k

        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        calls = handle.stats.summary()["calls"]
        for i, t in enumerate((500.0, 400.0)):  # timesteps never rise: no new generation, states stay warm
            restore()
            eager = _forward(model, latents, torch.tensor([t]), text)
            restore()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                torch.testing.assert_close(_forward(compiled, latents, torch.tensor([t]), text), eager)
        summary = handle.stats.summary()  # compiled calls are counted (on-device counters)
        assert summary["calls"] == calls + 16 and summary["masked_calls"] == summary["calls"]
    torch._dynamo.reset()


def test_warm_sparse_forward_reads_nothing_back(pipe):
    """A warm sparse Wan forward (k-means, selection, sparse attention, stats counters in every
    block) makes 0 host-device syncs by the hot-path counter when the timestep comes from the
    host (the pipeline's scheduler value); reading it from the forward's tensor argument is the
    one read, once per forward, never per layer."""
    from mmaccel.testing.hotpath import count_hot_path

    model = pipe.transformer
    x = _inputs()
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=0.0, backend="masked", kmeans_init_iters=3)  # fmt: skip
    with apply_svg2(model, cfg, lambda: 500.0) as handle:
        _forward(model, *x)  # cold start
        _forward(model, *x)
        counter = count_hot_path(lambda: _forward(model, *x))
        assert counter.syncs == 0, counter.sync_counts
        assert handle.stats.summary()["masked_calls"] == 3 * len(model.blocks)
    with apply_svg2(model, cfg):  # timestep from the forward's own (tensor) argument
        _forward(model, *x)
        _forward(model, *x)
        assert count_hot_path(lambda: _forward(model, *x)).sync_counts == {"item": 1}


def _family_inputs(family: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A tiny model of ``family`` and fixed keyword inputs of a forward."""
    from mmaccel.testing import (
        tiny_cogvideox_pipeline,
        tiny_hunyuan_video_inputs,
        tiny_hunyuan_video_transformer,
    )

    if family == "wan":
        latents, t, text = _inputs()
        return tiny_wan_pipeline().transformer, dict(hidden_states=latents, timestep=t, encoder_hidden_states=text)
    if family == "cogvideox":
        g = torch.Generator().manual_seed(0)
        kw = dict(hidden_states=torch.randn(1, 3, 4, 8, 12, generator=g),
                  encoder_hidden_states=torch.randn(1, 32, 32, generator=g), timestep=torch.tensor([500]))  # fmt: skip
        return tiny_cogvideox_pipeline().transformer, kw
    model = tiny_hunyuan_video_transformer()
    return model, tiny_hunyuan_video_inputs(model, valid_text=5)


def _family_forward(family: str):
    """A tiny model of ``family`` and a forward of it on fixed inputs (gradients as the caller's)."""
    model, kw = _family_inputs(family)
    return model, lambda: model(**{**kw, "return_dict": False})[0]


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
def test_cold_and_warm_steps_are_one_fullgraph_program(family):
    """A generation's cold step (k-means from the pre-forward hook's draw, ``kmeans_init_iters``
    rounds) and its warm steps (the stored centroids, ``kmeans_iters`` rounds) are one program
    under ``torch.compile(fullgraph=True)``: no recompile over cold, warm, warm and a new
    generation's cold step, each equal to eager with the same k-means memory after it."""
    model, kw = _family_inputs(family)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=0.0, backend="masked", kmeans_init_iters=5)  # fmt: skip
    handle = apply_svg2(model, cfg)

    def run(m) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        handle.reset_state()
        handle.stats.reset()
        steps = []
        with torch.no_grad():
            for step in range(4):
                if step == 3:
                    handle.reset_state()  # a new generation
                out = m(**{**kw, "hidden_states": kw["hidden_states"] + 0.1 * step, "return_dict": False})[0]
                memory = [x for p in handle.processors for x in (p.state.q_centroids, p.state.k_labels, p.state.density)]
                steps.append((out, memory))
        steps.append((torch.tensor(0.0), [torch.tensor(list(handle.stats.summary().values())[:6])]))  # call counts
        return steps

    eager = run(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(torch.compile(model, fullgraph=True, backend="eager"))
    torch._dynamo.reset()
    handle.remove()
    assert not torch.equal(eager[1][1][0], eager[2][1][0])  # the warm steps moved the centroids
    assert eager[-1][1][0][1] == 4 * len(handle.processors)  # sparse calls
    for (out, memory), (want, want_memory) in zip(compiled, eager, strict=True):
        torch.testing.assert_close(out, want)
        for got, ref in zip(memory, want_memory, strict=True):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
def test_cold_start_draw_is_made_before_the_forward(family, monkeypatch):
    """Every cold start of a forward takes the random draw the pre-forward hook made (its
    attention processors only gather): no draw from inside an attention call, and the
    centroids are those of a draw made in the call (the same seed, the same tokens)."""
    import inspect

    from mmaccel.sparse_attn import svg2

    callers = []
    draw = svg2._draw_indices

    def recording(key):
        callers.append(inspect.stack()[1].function)
        return draw(key)

    monkeypatch.setattr(svg2, "_draw_indices", recording)
    model, forward = _family_forward(family)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=0.0, backend="masked", kmeans_init_iters=2)  # fmt: skip
    with apply_svg2(model, cfg) as handle, torch.no_grad():
        forward()
        assert callers == ["_drawn"] * len(handle.processors)
        centroids = [(p.state.q_centroids, p.state.k_centroids) for p in handle.processors]
        forward()  # warm: nothing drawn
        assert len(callers) == len(handle.processors)
    monkeypatch.setattr(svg2, "_draw_indices", draw)
    with apply_svg2(model, cfg) as handle, torch.no_grad():
        for p in handle.processors:  # drop the hook's draws: each call draws itself
            p._start = lambda *args: None
        forward()
        for p, (cq, ck) in zip(handle.processors, centroids):
            assert torch.equal(p.state.q_centroids, cq) and torch.equal(p.state.k_centroids, ck)


def _train_steps(checkpointing: bool, steps: int = 2) -> tuple[list[torch.Tensor], list[Any], dict]:
    """Gradients of ``steps`` training steps (forward + backward each, SVG2 warm from the second)
    of a freshly patched tiny Wan, the k-means memory after each backward, and the stats."""
    model = tiny_wan_pipeline().transformer
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                     dense_layers=0.3, backend="masked", kmeans_init_iters=3)  # fmt: skip
    handle = apply_svg2(model, cfg)
    if checkpointing:
        model.enable_gradient_checkpointing()
    grads, memory = [], []
    for step in range(steps):
        latents, t, text = _inputs(step)
        model.zero_grad()
        model(latents, t - 100 * step, text, return_dict=False)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        memory.append([(p.state.q_centroids, p.state.k_centroids, p.state.calls) for p in handle.processors])
    summary = handle.stats.summary()
    handle.remove()
    return grads, memory, summary


def test_gradient_checkpointing_recomputes_with_the_forwards_clustering():
    """Two training steps with ``enable_gradient_checkpointing()`` (the second warm-starting
    k-means from the first): the same gradients as without, and the backward's recompute leaves
    the k-means memory (centroids, call counts) and the stats as the forward left them."""
    plain, plain_memory, plain_stats = _train_steps(checkpointing=False)
    checkpointed, memory, stats = _train_steps(checkpointing=True)
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for step, layers in zip(memory, plain_memory):
        for (q, k, calls), (q0, k0, calls0) in zip(step, layers):
            assert (q is None) == (q0 is None) and calls == calls0
            if q is not None:
                torch.testing.assert_close(q, q0)
                torch.testing.assert_close(k, k0)
    assert stats == plain_stats and stats["dense_calls"] == 2 and stats["masked_calls"] == 2 * 3


def test_a_recompute_without_its_forwards_decision_raises():
    """A recompute takes the layer's latest forward's decision: with none kept (also a reentrant
    checkpoint's), or after two forwards with gradients (it could be the earlier one's
    recompute), it raises."""
    model = tiny_wan_pipeline().transformer
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.0, dense_layers=0.0, backend="masked")
    with apply_svg2(model, cfg) as handle:
        model.enable_gradient_checkpointing()
        out = model(*_inputs(), return_dict=False)[0]
        assert all(p.kept is not None and p.kept_forwards == 1 for p in handle.processors)
        handle.processors[-1].kept = None
        with pytest.raises(RuntimeError, match="no forward of it ran with gradients"):
            out.sum().backward()
    with apply_svg2(model, cfg):
        first = model(*_inputs(), return_dict=False)[0]
        second = model(*_inputs(1), return_dict=False)[0]
        with pytest.raises(RuntimeError, match="after 2 forwards with gradients"):
            (first + second).sum().backward()
    with apply_svg2(model, cfg):  # a reentrant checkpoint's forward runs without gradients
        model.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
        with pytest.raises(RuntimeError, match="use_reentrant=True"):
            model(*_inputs(), return_dict=False)[0].sum().backward()
