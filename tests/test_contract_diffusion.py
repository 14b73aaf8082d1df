"""The technique contract (docs/architecture.md) for token density and SVG2, on tiny models.

Each check runs the technique with its *default* config (``apply(model, None, ...)``), so the
inputs are sized for the defaults: SVG2's reference settings cluster 1,000 key tokens.
"""

from __future__ import annotations

import pytest
import torch

from mmaccel.diffusion import TokenDensityConfig, TokenDensityHandle, apply_token_density
from mmaccel.sparse_attn import SVG2Config, SVG2Handle, apply_svg2
from mmaccel.testing import (
    check_technique_contract,
    tiny_cogvideox_pipeline,
    tiny_dit_pipeline,
    tiny_wan_pipeline,
)


def _dit_run(model):
    def run():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return model(hidden_states=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor([500, 500]),
                         class_labels=torch.tensor([1, 5])).sample  # fmt: skip

    return run


def _wan_run(model, shape, t):
    def run():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            latents, text = torch.randn(1, 16, *shape, generator=g), torch.randn(1, 8, 32, generator=g)
            return model(latents, torch.tensor([float(t)]), text, return_dict=False)[0]

    return run


@pytest.mark.parametrize("family", ["dit", "wan"])
def test_token_density_contract(family):
    if family == "dit":
        model = tiny_dit_pipeline().transformer
        run = _dit_run(model)
    else:
        model = tiny_wan_pipeline().transformer
        run = _wan_run(model, (3, 8, 12), 500)
    summary = check_technique_contract(TokenDensityConfig, apply_token_density, TokenDensityHandle, model, run)
    assert summary["forwards"] == 1 and summary["reduced_forwards"] == 1  # t=500: the default schedule reduces
    assert 0 < summary["token_ratio"] < 1


def test_svg2_contract_wan():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_wan_pipeline().transformer
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(5)  # floor(0.2 * 5) = 1 dense step: the last step is sparse
    run = _wan_run(model, (2, 40, 50), scheduler.timesteps[-1])  # 2 x 20 x 25 = 1,000 video tokens
    summary = check_technique_contract(SVG2Config, apply_svg2, SVG2Handle, model, run, scheduler=scheduler)
    assert summary["calls"] == 4 and summary["masked_calls"] == 4  # floor(0.03 * 4) = 0 dense layers
    assert 0 < summary["sparse_density"] < 1


def test_svg2_contract_cogvideox():
    from diffusers import DDIMScheduler

    model = tiny_cogvideox_pipeline().transformer
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(5)
    t = int(scheduler.timesteps[-1])

    def run():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            latents, text = torch.randn(1, 2, 4, 40, 50, generator=g), torch.randn(1, 32, 32, generator=g)
            return model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([t]),
                         return_dict=False)[0]  # fmt: skip

    summary = check_technique_contract(SVG2Config, apply_svg2, SVG2Handle, model, run, scheduler=scheduler)
    assert summary["calls"] == 4 and summary["sparse_calls"] == 4
    assert 0 < summary["sparse_density"] < 1
