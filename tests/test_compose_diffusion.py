"""Diffusion techniques composed with the toolchain diffusers users run: offloading, bf16,
attention backends, diffusers caches (issue #17). Tiny real-class pipelines, 2-3 steps, CPU.

The matrix these tests fill is docs/compat.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    apply_first_block_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.attention_dispatch import attention_backend

from mmaccel.diffusion import (
    FlexDiTConfig,
    TokenDensityConfig,
    apply_token_density,
    convert_to_flexdit,
)
from mmaccel.runtime.budget import ConstantSchedule
from mmaccel.sparse_attn import SVG2Config, apply_svg2
from mmaccel.testing import (
    call_kwargs,
    tiny_cogvideox_pipeline,
    tiny_dit_pipeline,
    tiny_pixart_pipeline,
    tiny_wan_pipeline,
)
from mmaccel.testing.offload import OFFLOAD_KINDS, enable_offload

FULL, QUARTER = ConstantSchedule(1.0), ConstantSchedule(0.25)
#: SVG2 that really drops pairs (half the layers sparse, top-p 0.5)
SVG2_SPARSE = SVG2Config(num_q_clusters=6, num_k_clusters=9, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                         dense_layers=0.5, backend="masked")  # fmt: skip
#: SVG2 keeping every pair: equals dense attention up to rounding
SVG2_FULL = SVG2Config(num_q_clusters=6, num_k_clusters=9, top_p=1.0, min_kc_ratio=1.0, dense_steps=0.0,
                       dense_layers=0.0, backend="masked")  # fmt: skip
BUILDERS = {"dit": tiny_dit_pipeline, "pixart": tiny_pixart_pipeline, "wan": tiny_wan_pipeline,
            "cogvideox": tiny_cogvideox_pipeline}  # fmt: skip


def _apply(technique, transformer):
    if technique == "token_density":
        return apply_token_density(transformer, TokenDensityConfig(schedule=QUARTER))
    return apply_svg2(transformer, SVG2_SPARSE)


def _generate(pipe, name, steps=2):
    """The denoised latents of one seeded pipeline run (no VAE decode: it is not ours)."""
    out = pipe(**{**call_kwargs(name), "num_inference_steps": steps, "output_type": "latent"})
    return out.frames if name == "wan" else out.images


def _inputs(name, dtype=torch.float32, t=500.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if name == "dit":
        return dict(hidden_states=r(2, 4, 32, 32), timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 5]))
    if name == "pixart":
        return dict(hidden_states=r(2, 4, 32, 32), timestep=torch.tensor([t, t]), encoder_hidden_states=r(2, 8, 32),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})  # fmt: skip
    if name == "wan":
        return dict(hidden_states=r(2, 16, 3, 8, 12), timestep=torch.tensor([t, t]), encoder_hidden_states=r(2, 8, 32))
    return dict(hidden_states=r(1, 3, 4, 8, 12), timestep=torch.tensor([int(t)]), encoder_hidden_states=r(1, 32, 32))


@torch.no_grad()
def _forward(model, name, dtype=torch.float32, **kw):
    return model(**_inputs(name, dtype, **kw), return_dict=False)[0]


# --------------------------------------------------------------------------------------------
# 1. Offloading with real techniques
# --------------------------------------------------------------------------------------------

CASES = [("token_density", "pixart"), ("token_density", "wan"), ("svg2", "wan")]


@pytest.fixture(scope="module")
def references():
    """Per case: the dense run and the technique-alone run (no offloading)."""
    refs = {}
    for technique, name in CASES:
        pipe = BUILDERS[name]()
        dense = _generate(pipe, name)
        with _apply(technique, pipe.transformer):
            patched = _generate(pipe, name)
        assert not torch.allclose(patched, dense, atol=1e-3), "the technique must change the output"
        refs[technique, name] = dense, patched
    return refs


def _counting_offload(pipe, kind, name, blocks=None):
    """Run the pipeline once, counting calls through the offloading machinery."""
    if blocks is None:
        blocks = pipe.transformer.blocks if name == "wan" else pipe.transformer.transformer_blocks
    if kind == "model":  # accelerate calls module._hf_hook.pre_forward at every forward
        owner, attr = pipe.transformer._hf_hook, "pre_forward"
    else:  # diffusers' group offloading onloads through hook.group.onload_()
        owner, attr = blocks[0]._diffusers_hook.get_hook("group_offloading").group, "onload_"
    calls, original = [], getattr(owner, attr)
    setattr(owner, attr, lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    try:
        out = _generate(pipe, name)
    finally:
        setattr(owner, attr, original)
    return len(calls), out


@pytest.mark.parametrize("kind", OFFLOAD_KINDS)
@pytest.mark.parametrize("technique,name", CASES)
def test_offloading_with_technique_both_orders(references, technique, name, kind):
    dense, patched = references[technique, name]
    pipe = BUILDERS[name]()
    # order 1: apply -> offload -> run -> remove
    handle = _apply(technique, pipe.transformer)
    enable_offload(pipe, kind)
    for _order in ("apply first", "offload first"):
        calls, out = _counting_offload(pipe, kind, name)
        assert calls > 0
        torch.testing.assert_close(out, patched, rtol=0, atol=1e-5)
        handle.remove()
        calls, out = _counting_offload(pipe, kind, name)
        assert calls > 0, "remove() dropped the offload hook"
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)
        # order 2: (offload already on) -> apply -> run -> remove
        handle = _apply(technique, pipe.transformer)
    handle.remove()


@pytest.mark.parametrize("kind", OFFLOAD_KINDS)
def test_offloading_a_flexdit_model(kind):
    """A converted FlexDiT model is an ordinary ``ModelMixin``: model offload wraps it, group
    offload groups its ``pooling_blocks`` / ``sdt_modules`` / ``dense_blocks``; output unchanged."""
    cfg = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 0), top_dense_blocks=0,
                        sparse_grid=(8, 8))  # fmt: skip
    pipe = tiny_pixart_pipeline()
    pipe.transformer = convert_to_flexdit(pipe.transformer, cfg)
    ref = _generate(pipe, "pixart")
    pipe = tiny_pixart_pipeline()
    pipe.transformer = convert_to_flexdit(pipe.transformer, cfg)
    enable_offload(pipe, kind)
    calls, out = _counting_offload(pipe, kind, "pixart", blocks=pipe.transformer.pooling_blocks)
    assert calls > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_sequential_cpu_offload_fails_on_cpu_without_mmaccel():
    """``enable_sequential_cpu_offload(device="cpu")`` breaks a plain tiny pipeline (accelerate
    re-creates parameters with ``requires_grad`` on a meta-offloaded CPU model): nothing of ours
    is involved, so the combination is untestable on CPU. If accelerate fixes it, this test fails
    and the combination must be tested here."""
    pipe = tiny_pixart_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.enable_sequential_cpu_offload(device="cpu")
        with pytest.raises(TypeError, match="requires_grad"):
            _generate(pipe, "pixart")


# --------------------------------------------------------------------------------------------
# 2. bf16
# --------------------------------------------------------------------------------------------

#: bf16 has an 8-bit mantissa; a 4-6 layer tiny model's dense bf16 output vs. a reordering of the
#: same arithmetic (full-budget technique) differs by a few ulp of values of magnitude ~1-4.
BF16_ATOL = 0.1


@pytest.fixture(scope="module")
def bf16_models():
    return {name: build(dtype=torch.bfloat16).transformer for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", ["dit", "pixart", "wan"])
def test_bf16_token_density(bf16_models, name):
    model = bf16_models[name]
    dense = _forward(model, name, torch.bfloat16)
    assert dense.dtype == torch.bfloat16
    with apply_token_density(model, TokenDensityConfig(schedule=FULL)):
        torch.testing.assert_close(_forward(model, name, torch.bfloat16), dense, rtol=0, atol=BF16_ATOL)
    with apply_token_density(model, TokenDensityConfig(schedule=QUARTER)):
        reduced = _forward(model, name, torch.bfloat16)
    assert reduced.dtype == torch.bfloat16 and torch.isfinite(reduced).all()
    assert not torch.equal(reduced, dense)
    assert torch.equal(_forward(model, name, torch.bfloat16), dense)


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_bf16_flexdit(bf16_models, name):
    model = bf16_models[name]
    dense = _forward(model, name, torch.bfloat16)
    n = len(model.transformer_blocks)
    # full sparse grid + upsampled merge: every SDTM reproduces its dense blocks
    layout = (1, 1, 1, 0) if n == 6 else (1, 1, 1, 1)
    exact = FlexDiTConfig(pooling_blocks=0, num_modules=n // sum(layout), module_layout=layout, top_dense_blocks=0,
                          sparse_grid=(16, 16), merge_init="upsampled")  # fmt: skip
    flex = convert_to_flexdit(model, exact)
    assert next(flex.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(_forward(flex, name, torch.bfloat16), dense, rtol=0, atol=BF16_ATOL)
    small = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 0), top_dense_blocks=n - 4,
                          sparse_grid=(8, 8))  # fmt: skip
    out = _forward(convert_to_flexdit(model, small), name, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, dense)


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_bf16_svg2(bf16_models, name):
    model = bf16_models[name]
    dense = _forward(model, name, torch.bfloat16)
    with apply_svg2(model, SVG2_FULL):
        torch.testing.assert_close(_forward(model, name, torch.bfloat16), dense, rtol=0, atol=BF16_ATOL)
    with apply_svg2(model, SVG2Config(**{**SVG2_FULL.__dict__, "top_p": 0.5, "min_kc_ratio": 0.0})) as handle:
        sparse = _forward(model, name, torch.bfloat16)
        assert handle.stats.summary()["sparse_density"] < 1.0
    assert sparse.dtype == torch.bfloat16 and torch.isfinite(sparse).all() and not torch.equal(sparse, dense)
    assert torch.equal(_forward(model, name, torch.bfloat16), dense)


# --------------------------------------------------------------------------------------------
# 3. Attention backends
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_model():
    return tiny_wan_pipeline().transformer


@pytest.mark.parametrize("backend", ["native", "flex"])
def test_attention_backend_reaches_svg2_dense_parts(wan_model, backend):
    model = wan_model
    dense = _forward(model, "wan")
    with apply_svg2(model, SVG2_SPARSE) as handle:  # layers 0-1 dense (through dispatch), 2-3 sparse
        ref = _forward(model, "wan")
        model.set_attention_backend(backend)
        try:
            assert all(p._attention_backend.value == backend for p in handle.processors)
            torch.testing.assert_close(_forward(model, "wan"), ref, rtol=0, atol=1e-5)
        finally:
            model.reset_attention_backend()
        assert all(p._attention_backend is None for p in handle.processors)
        with attention_backend(backend):  # the context manager: processors without their own choice
            torch.testing.assert_close(_forward(model, "wan"), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(_forward(model, "wan"), dense, rtol=0, atol=1e-5)
    # a backend chosen while SVG2 is applied stays chosen after remove(), on diffusers' processors
    originals = [b.attn1.processor for b in model.blocks]
    handle = apply_svg2(model, SVG2_SPARSE)
    model.set_attention_backend(backend)
    handle.remove()
    try:
        assert [b.attn1.processor for b in model.blocks] == originals
        assert all(p._attention_backend.value == backend for p in originals)
        torch.testing.assert_close(_forward(model, "wan"), dense, rtol=0, atol=1e-5)
    finally:
        model.reset_attention_backend()


@pytest.mark.parametrize("backend", ["native", "flex"])
def test_attention_backend_reaches_token_density_attention(wan_model, backend):
    """Token density routes Wan's sparse-q / sparse-kv attention through the adapter, which
    dispatches with the backend that ``set_attention_backend`` put on the block's processor."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model = wan_model
    cfg = TokenDensityConfig(schedule=QUARTER, pooled_blocks=None, sparse_blocks=(0, 4), sparse_mode="sparse_kv")
    seen = []
    dispatch = _AttentionBackendRegistry._backends

    with apply_token_density(model, cfg):
        ref = _forward(model, "wan")
        model.set_attention_backend(backend)
        try:
            assert all(b.attn1.processor._attention_backend.value == backend for b in model.blocks)
            name = model.blocks[0].attn1.processor._attention_backend
            original = dispatch[name]
            dispatch[name] = lambda *a, **k: (seen.append(1), original(*a, **k))[1]
            try:
                out = _forward(model, "wan")
            finally:
                dispatch[name] = original
        finally:
            model.reset_attention_backend()
    assert seen, f"backend {backend} was never called"
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_pixart_dit_processors_do_not_dispatch():
    """DiT / PixArt keep diffusers' ``AttnProcessor2_0`` (plain SDPA, no dispatch): token density
    and FlexDiT there run whatever SDPA picks; ``set_attention_backend`` has nothing to set."""
    model = tiny_pixart_pipeline().transformer
    proc = model.transformer_blocks[0].attn1.processor
    assert type(proc).__name__ == "AttnProcessor2_0" and not hasattr(proc, "_attention_backend")


# --------------------------------------------------------------------------------------------
# 4. Caches
# --------------------------------------------------------------------------------------------

STEPS = 3


def _caches(strict):
    """(name, config) pairs; ``strict`` = a setting under which the cache never skips."""
    if strict:
        return [("fbc", FirstBlockCacheConfig(threshold=1e-9)),
                ("mag", MagCacheConfig(threshold=1e-9, num_inference_steps=STEPS, retention_ratio=0.0,
                                       mag_ratios=[0.5] * STEPS))]  # fmt: skip
    return [("fbc", FirstBlockCacheConfig(threshold=0.5)),
            ("mag", MagCacheConfig(threshold=10.0, num_inference_steps=STEPS, retention_ratio=0.0,
                                   mag_ratios=[1.0] * STEPS))]  # fmt: skip


@pytest.mark.parametrize("technique", ["token_density", "svg2"])
@pytest.mark.parametrize("order", ["technique-first", "cache-first"])
def test_caches_compose_on_wan(technique, order):
    pipe = tiny_wan_pipeline()
    model = pipe.transformer
    dense = _generate(pipe, "wan", STEPS)
    with _apply(technique, model):
        alone = _generate(pipe, "wan", STEPS)
    if technique == "token_density" and order == "cache-first":
        # a block cache registered first would sit inside our reduce/expand and see reduced tokens
        for _, cfg in _caches(True):
            model.enable_cache(cfg)
            with pytest.raises(ValueError, match="apply token density first"):
                _apply(technique, model)
            model.disable_cache()
        torch.testing.assert_close(_generate(pipe, "wan", STEPS), dense, rtol=0, atol=1e-6)
        return
    for (cache, strict), (_, loose) in zip(_caches(True), _caches(False)):
        for cfg, must_equal in ((strict, True), (loose, False)):
            if order == "technique-first":
                handle = _apply(technique, model)
                model.enable_cache(cfg)
            else:
                model.enable_cache(cfg)
                handle = _apply(technique, model)
            out = _generate(pipe, "wan", STEPS)
            assert torch.isfinite(out).all()
            if must_equal:  # nothing skipped: the technique alone, to rounding
                torch.testing.assert_close(out, alone, rtol=0, atol=1e-5, msg=f"{cache} changed the output")
            else:  # the cache skipped blocks on top of the technique
                assert not torch.allclose(out, alone, atol=1e-4), f"{cache} skipped nothing"
            # undo in the opposite order on even rounds, same order on odd ones
            if must_equal:
                handle.remove()
                model.disable_cache()
            else:
                model.disable_cache()
                handle.remove()
            torch.testing.assert_close(_generate(pipe, "wan", STEPS), dense, rtol=0, atol=1e-6)
            assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks
            for name, module in model.named_modules():  # no layer of ours or the cache's left behind
                assert getattr(module.forward, "__func__", None) is type(module).forward, name


def test_first_block_cache_on_pixart_without_cache_mixin():
    """diffusers 0.42's PixArt transformer has no ``CacheMixin`` and its pipeline sets no cache
    context. ``apply_first_block_cache`` plus a context set by hand works, with token density."""
    pipe = tiny_pixart_pipeline()
    model = pipe.transformer
    assert not hasattr(model, "enable_cache")
    dense = _generate(pipe, "pixart", STEPS)
    with apply_token_density(model, TokenDensityConfig(schedule=QUARTER)) as handle:
        alone = _generate(pipe, "pixart", STEPS)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=1e-9))
        _set_cache_context(model, CacheContext("pixart"))  # what CacheMixin.cache_context does
        try:
            out = _generate(pipe, "pixart", STEPS)
        finally:
            _set_cache_context(model, None)
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-5)
        assert handle.stats.steps[-1].token_ratio < 1
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_leader_block_hook", recurse=True)
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_block_hook", recurse=True)
    torch.testing.assert_close(_generate(pipe, "pixart", STEPS), dense, rtol=0, atol=1e-6)


def test_flexdit_has_no_cache_support():
    """A FlexDiT model keeps its blocks in ``pooling_blocks`` / ``sdt_modules`` / ``dense_blocks``,
    none of diffusers' block-list names, and has no ``CacheMixin``: diffusers' block caches find
    no blocks to hook. Not supported (say so rather than pretend)."""
    flex = convert_to_flexdit(
        tiny_pixart_pipeline().transformer, FlexDiTConfig(pooling_blocks=1, num_modules=0, top_dense_blocks=3)
    )
    assert not hasattr(flex, "enable_cache")
    with pytest.raises(IndexError):
        apply_first_block_cache(flex, FirstBlockCacheConfig(threshold=0.1))
