"""The technique contract (docs/architecture.md) for clip parallelism at world size 1, tiny Wan.

``apply_clip_parallel(transformer, None, ctx=..., num_latent_frames=...)`` runs the reference
defaults (local band, zero K/V at the video ends, clip-stride global frames, phase bias 10 at the
850 boundary); with one rank that is still not the dense model below the boundary (the band and
the zero end frames are favoured), while above it the +10 on the global frames, every frame at one
rank, makes it nearly dense. ``remove()`` restores the dense output bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from mmaccel.parallel_video import ClipParallelConfig, ClipParallelHandle, apply_clip_parallel
from mmaccel.runtime.distributed import DistContext
from mmaccel.testing import check_technique_contract, tiny_wan_pipeline


def _wan_run(model, frames: int, t: float):
    def run():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            latents, text = torch.randn(1, 16, frames, 4, 6, generator=g), torch.randn(1, 8, 32, generator=g)
            return model(latents, torch.tensor([t]), text, return_dict=False)[0]

    return run


@pytest.mark.parametrize("t", [900.0, 300.0], ids=["global-phase", "local-phase"])
def test_clip_parallel_contract_one_rank(t):
    model = tiny_wan_pipeline().transformer
    ctx = DistContext.single()
    run = _wan_run(model, 4, t)
    dense = run()
    summary = check_technique_contract(
        ClipParallelConfig, apply_clip_parallel, ClipParallelHandle, model, run, ctx=ctx, num_latent_frames=4
    )
    layers = len(model.blocks)
    assert summary["calls"] == layers and summary["sent_bytes"] == 0 and summary["recv_bytes"] == 0
    # band of 3 frames (zero frames at the ends included) + 4 global frames (clip stride 1), per query frame
    assert summary["key_frames_per_query"] == pytest.approx(3 + 4)
    with apply_clip_parallel(model, ctx=ctx, num_latent_frames=4) as handle:
        banded = run()
        assert handle.stats.summary()["calls"] == layers
    relative = float((banded - dense).norm() / dense.norm())
    if t >= 850:  # +10 on the global keys (all 4 frames at one rank): the band and zero keys fade out
        assert relative < 1e-4
    else:  # +10 on the band of 3 frames, one of them a zero frame at either end: not dense attention
        assert relative > 1e-2
    torch.testing.assert_close(run(), dense, rtol=0, atol=0)


def test_dense_options_reproduce_the_model_at_one_rank():
    model = tiny_wan_pipeline().transformer
    run = _wan_run(model, 4, 500.0)
    dense = run()
    config = ClipParallelConfig(padding=2, global_frames=2, local_scope="window", end_keys="none", global_sampling="uniform")
    with apply_clip_parallel(model, config, ctx=DistContext.single(), num_latent_frames=4):
        torch.testing.assert_close(run(), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(local_scope="ring"), ValueError, "local_scope must be one of"),
        (dict(end_keys=0), TypeError, "end_keys"),
        (dict(global_sampling="random"), ValueError, "global_sampling must be one of"),
    ],
)
def test_config_options_validate(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClipParallelConfig(**kwargs)


def test_apply_checks_its_arguments():
    model = tiny_wan_pipeline().transformer
    ctx = DistContext.single()
    with pytest.raises(ValueError, match="num_latent_frames must be an int >= 1"):
        apply_clip_parallel(model, ctx=ctx, num_latent_frames=0)
    with pytest.raises(TypeError, match="ctx must be a DistContext"):
        apply_clip_parallel(model, ctx=None, num_latent_frames=4)
    with pytest.raises(TypeError, match="current_timestep_callback"):
        apply_clip_parallel(model, ctx=ctx, num_latent_frames=4, current_timestep_callback=5)
    with apply_clip_parallel(model, ctx=ctx, num_latent_frames=4, current_timestep_callback=lambda: -1.0):
        with pytest.raises(ValueError, match="not a timestep"):
            _wan_run(model, 4, 500.0)()
