"""Per-sample and per-token timesteps (issue #32 A): the noisiest element decides, for every
technique that reads the transformer's timestep; nothing is refused that is a timestep."""

from __future__ import annotations

import pytest
import torch

from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density
from mmaccel.runtime.timesteps import read_timestep
from mmaccel.testing import tiny_dit_pipeline


def test_per_sample_and_per_token_timesteps_read_as_the_noisiest() -> None:
    assert read_timestep(torch.tensor([999.0, 10.0, 500.0])) == 999.0
    per_token = torch.full((2, 16), 700.0)
    per_token[:, :4] = 0.0  # TI2V: the first frame's tokens are clean
    assert read_timestep(per_token) == 700.0
    assert read_timestep(torch.tensor([250.0, 250.0])) == 250.0
    assert read_timestep(torch.tensor(3)) == 3.0


@pytest.mark.parametrize("bad", [[float("nan"), 10.0], [-1.0, 10.0], [10.0, 1001.0]])
def test_a_tensor_holding_a_non_timestep_is_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="timestep"):
        read_timestep(torch.tensor(bad))


def test_token_density_takes_per_sample_timesteps_by_the_noisiest() -> None:
    pipe = tiny_dit_pipeline()
    model = pipe.transformer
    cfg = model.config
    torch.manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels = torch.tensor([1, 2])
    mixed, noisy, clean = torch.tensor([100.0, 900.0]), torch.tensor([900.0, 900.0]), torch.tensor([100.0, 100.0])
    with torch.no_grad(), apply_token_density(model, TokenDensityConfig()):
        out_mixed = model(x, timestep=mixed, class_labels=labels).sample
        out_noisy = model(x, timestep=noisy, class_labels=labels).sample
        out_clean = model(x, timestep=clean, class_labels=labels).sample
    # t=900 is reduced by the default schedule, t=100 is dense: the mixed batch takes the noisy
    # batch's (reduced) plan, so each sample equals its twin in the batch with that plan
    torch.testing.assert_close(out_mixed[1], out_noisy[1])
    assert not torch.allclose(out_mixed[0], out_clean[0])
