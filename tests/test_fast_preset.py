"""The ``fast`` preset (issue #28): token density, then the family's diffusers cache.

Tiny real-class pipelines, 3 steps, CPU. The preset must equal its parts applied by hand, undo
exactly, and validate its config; its per-family token density is checked field by field.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from mmaccel.diffusion import TokenDensityConfig, apply_token_density
from mmaccel.diffusion.presets import (
    FAST_CACHES,
    FAST_DENSE_UNTIL,
    FastConfig,
    apply_fast,
    fast_token_density,
)
from mmaccel.testing import call_kwargs, tiny_dit_pipeline, tiny_pixart_pipeline, tiny_wan_pipeline

STEPS = 3
BUILDERS = {"dit": tiny_dit_pipeline, "pixart": tiny_pixart_pipeline, "wan": tiny_wan_pipeline}
_HOOKS = {"mag": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
          "first_block": ("fbc_leader_block_hook", "fbc_block_hook")}  # fmt: skip


def _generate(pipe, name: str) -> torch.Tensor:
    """The denoised latents of one seeded pipeline run (no VAE decode)."""
    out = pipe(**{**call_kwargs(name), "num_inference_steps": STEPS, "output_type": "latent"})
    return torch.as_tensor(out.frames if name == "wan" else out.images)  # DiTPipeline returns numpy


def _by_hand(pipe, name: str, td: TokenDensityConfig, cache: str, cache_config) -> torch.Tensor:
    """Token density, then the cache with a ``"cond"`` context, one run, both removed."""
    model = pipe.transformer
    with apply_token_density(model, td, scheduler=pipe.scheduler):
        (apply_mag_cache if cache == "mag" else apply_first_block_cache)(model, cache_config)
        _set_cache_context(model, CacheContext("cond"))
        try:
            return _generate(pipe, name)
        finally:
            _set_cache_context(model, None)
            registry = HookRegistry.check_if_exists_or_initialize(model)
            for hook in _HOOKS[cache]:
                registry.remove_hook(hook, recurse=True)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fast_preset_equals_its_parts_and_removes_exactly(name):
    """``apply_fast`` = `fast_token_density` applied first and MagCache at diffusers' defaults
    second; ``.remove()`` gives the dense run back bit for bit."""
    pipe = BUILDERS[name]()
    model = pipe.transformer
    dense = _generate(pipe, name)
    ratios = (1.0,) * STEPS  # every step looks skippable: the cache acts after the retention steps
    td = fast_token_density(model)
    manual = _by_hand(pipe, name, td, "mag", MagCacheConfig(num_inference_steps=STEPS, mag_ratios=list(ratios)))
    torch.testing.assert_close(_generate(pipe, name), dense, rtol=0, atol=0)  # the manual run left nothing behind
    assert FAST_CACHES[type(model).__name__] == "mag"
    with apply_fast(model, FastConfig(num_inference_steps=STEPS, mag_ratios=ratios), scheduler=pipe.scheduler) as h:
        fast = _generate(pipe, name)
        assert h.cache == "mag" and h.stats.summary()["forwards"] >= 1
    torch.testing.assert_close(fast, manual, rtol=0, atol=1e-6)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(_generate(pipe, name), dense, rtol=0, atol=1e-6)


def test_fast_preset_first_block_cache_and_given_token_density_equal_their_parts():
    """``cache="first_block"`` with an explicit ``token_density`` installs exactly those two."""
    pipe = tiny_pixart_pipeline()
    td = TokenDensityConfig(sparse_mode="sparse_kv", schedule=fast_token_density(pipe.transformer).schedule)
    manual = _by_hand(pipe, "pixart", td, "first_block", FirstBlockCacheConfig(threshold=0.3))
    config = FastConfig(num_inference_steps=STEPS, token_density=td, cache="first_block", first_block_threshold=0.3)
    with apply_fast(pipe.transformer, config, scheduler=pipe.scheduler) as handle:
        fast = _generate(pipe, "pixart")
    assert handle.cache == "first_block"
    torch.testing.assert_close(fast, manual, rtol=0, atol=1e-6)


def test_fast_token_density_per_family():
    """PixArt / Wan: dense before progress `FAST_DENSE_UNTIL`, a quarter of the tokens after, every
    block pooled; DiT: sparse_q at half the tokens from progress 0.7, the auto layout."""
    for name, factor in (("pixart", (2, 2)), ("wan", (1, 2, 2))):
        model = BUILDERS[name]().transformer
        depth = len(model.blocks if name == "wan" else model.transformer_blocks)
        td = fast_token_density(model)
        assert td.factor == factor and td.reducer == "pool" and td.sparse_blocks is None
        assert td.pooled_blocks == (0, depth)
        assert td.schedule(0.0) == 1.0 and td.schedule(FAST_DENSE_UNTIL / 2) == 1.0
        assert td.schedule(FAST_DENSE_UNTIL) == 0.25 and td.schedule(1.0) == 0.25
    td = fast_token_density(tiny_dit_pipeline().transformer)
    assert (td.factor, td.pooled_blocks, td.sparse_blocks, td.sparse_mode) == ((2, 2), "auto", "auto", "sparse_q")
    assert td.schedule(0.69) == 1.0 and td.schedule(0.7) == 0.5 and td.schedule(1.0) == 0.5


def test_fast_preset_keeps_the_noisiest_step_dense():
    """The preset's token density runs the first step (progress < 0.05) dense and reduces the
    later ones (stats of a 3-step PixArt run, no cache skips: threshold-free FirstBlockCache)."""
    pipe = tiny_pixart_pipeline()
    config = FastConfig(num_inference_steps=STEPS, cache="first_block", first_block_threshold=1e-6)
    with apply_fast(pipe.transformer, config, scheduler=pipe.scheduler) as handle:
        _generate(pipe, "pixart")
    keeps = [s.keep_ratio for s in handle.stats.steps]
    assert len(keeps) == STEPS and keeps[0] == 1.0 and all(k == 0.25 for k in keeps[1:])


def test_fast_token_density_refuses_other_models():
    with pytest.raises(NotImplementedError, match="fast preset supports"):
        fast_token_density(torch.nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="fast preset supports"):
        apply_fast(torch.nn.Linear(2, 2), FastConfig(mag_ratios=(1.0,) * 20))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [(dict(num_inference_steps=1), ValueError, "num_inference_steps"),
     (dict(num_inference_steps=2.0), TypeError, "num_inference_steps"),
     (dict(cache="taylor"), ValueError, "cache"),
     (dict(num_inference_steps=3, mag_ratios=(1.0, 1.0)), ValueError, "mag_ratios"),
     (dict(num_inference_steps=2, mag_ratios=[1.0, 1.0]), ValueError, "mag_ratios"),
     (dict(token_density={"factor": (2, 2)}), TypeError, "token_density"),
     (dict(first_block_threshold=0.0), ValueError, "first_block_threshold")],
)  # fmt: skip
def test_fast_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastConfig(**kwargs)


def test_fast_preset_needs_mag_ratios_and_a_config():
    model = tiny_pixart_pipeline().transformer
    with pytest.raises(ValueError, match="mag_ratios"):
        apply_fast(model, FastConfig(num_inference_steps=STEPS))
    with pytest.raises(TypeError, match="config"):
        apply_fast(model, TokenDensityConfig())  # type: ignore[arg-type]
    assert not HookRegistry.check_if_exists_or_initialize(model).hooks


def test_bench_target_line_met_and_missed():
    """``bench_peers_dit.target_line``: PixArt / Wan need >= 1.2x over ToMe + MagCache at equal or
    better PSNR; the zoo needs to be ahead of MagCache at accuracy >= 0.97; other models: none."""
    from mmaccel.benchmarks.bench_peers_dit import FAST_ROW, OURS, PEER, Scored, target_line

    def rows(fast_speed: float, fast_psnr: float, peer: str) -> dict[str, Scored]:
        return {FAST_ROW: Scored(FAST_ROW, OURS, fast_speed, fast_speed, fast_speed, fast_psnr),
                peer: Scored(peer, PEER, 2.0, 1.9, 2.1, 60.0)}  # fmt: skip

    assert "**met**" in target_line("PixArt", rows(2.5, 60.0, "ToMe + MagCache"), {})
    assert "**missed**" in target_line("PixArt", rows(2.3, 65.0, "ToMe + MagCache"), {})  # 1.15x
    assert "**missed**" in target_line("Wan", rows(3.0, 59.9, "ToMe + MagCache"), {})  # lower PSNR
    zoo = rows(2.2, 20.0, "MagCache")
    assert "**met**" in target_line("zoo Digits DiT", zoo, {FAST_ROW: 0.97, "MagCache": 0.98})
    assert "**missed**" in target_line("zoo Digits DiT", zoo, {FAST_ROW: 0.96, "MagCache": 0.98})
    assert "**missed**" in target_line("zoo Digits DiT", rows(2.0, 30.0, "MagCache"), {FAST_ROW: 1.0, "MagCache": 1.0})
    assert target_line("DiT", rows(2.5, 60.0, "ToMe + MagCache"), {}) == ""
