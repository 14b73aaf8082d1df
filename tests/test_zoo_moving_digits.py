"""The `moving-digits` zoo model: committed weights load as a standard WanPipeline, generated
videos move the prompted way, SVG2 at full density is dense, and the scoring helpers measure
what they claim."""

from __future__ import annotations

import pytest
import torch

from mmaccel.apps.zoo import moving_digits as md
from mmaccel.apps.zoo import zoo_path


@pytest.fixture(scope="module")
def pipe():
    return md.load()


def test_loads_as_standard_wan_pipeline(pipe):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    plain = WanPipeline.from_pretrained(zoo_path(md.NAME))
    assert isinstance(pipe, WanPipeline)
    assert isinstance(plain.transformer, WanTransformer3DModel) and isinstance(plain.vae, AutoencoderKLWan)
    assert (plain.vae_scale_factor_spatial, plain.vae_scale_factor_temporal) == (4, 4)
    assert not pipe.transformer.training
    assert pipe.tokenizer.tokenize(md.prompt_for(3, "left")) == ["▁digit", "▁3", "▁moving", "▁left"]
    for a, b in zip(plain.transformer.parameters(), pipe.transformer.parameters()):
        assert torch.equal(a, b)
    assert (zoo_path(md.NAME) / "README.md").read_text().count("not a general-purpose model") == 1


def test_generated_videos_move_as_prompted(pipe):
    # The committed model gets the direction right (40/40 at 20 steps) but draws blobs, not
    # recognisable digits (digit accuracy 0.125, chance 0.1): only the motion is checked here.
    digits, directions = [3, 7, 0, 5], ["left", "down", "right", "up"]
    videos = md.generate(pipe, digits, directions, seed=0, num_inference_steps=10)
    assert videos.shape == (4, md.NUM_FRAMES, md.SIZE, md.SIZE)
    _, pred_r = md.classify_videos(videos)
    assert pred_r.tolist() == [md.DIRECTIONS.index(r) for r in directions]
    speed = md.measure_motion(videos).norm(dim=-1)
    assert torch.all((speed > 0.25) & (speed < 3.0)), speed  # measured 0.40-1.31 px/frame


def test_svg2_at_full_density_reproduces_dense(pipe):
    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    dense = md.generate(pipe, [2], ["up"], seed=1, num_inference_steps=3)
    config = SVG2Config(num_q_clusters=8, num_k_clusters=16, top_p=1.0, min_kc_ratio=1.0, dense_steps=0.0,
                        dense_layers=0.0, backend="masked")  # fmt: skip
    with apply_svg2(pipe.transformer, config) as handle:
        sparse = md.generate(pipe, [2], ["up"], seed=1, num_inference_steps=3)
    summary = handle.stats.summary()
    assert summary["sparse_calls"] == summary["calls"] > 0 and summary["sparse_density"] == pytest.approx(1.0)
    torch.testing.assert_close(sparse, dense, atol=2e-4, rtol=0)


def test_scorer_on_real_held_out_videos():
    videos, digits, directions = md._test_videos(count=40)
    pred_d, pred_r = md.classify_videos(videos)
    assert torch.equal(pred_r, directions)
    assert (pred_d == digits).float().mean() >= 0.9
    torch.testing.assert_close(md.measure_motion(videos).norm(dim=-1), torch.full((40,), float(md.SPEED)))


def test_moving_digit_videos_wraps_around():
    glyph = torch.zeros(1, 1, 4, 4)
    glyph[0, 0, 0, 0] = 1.0
    video = md.moving_digit_videos(
        glyph, torch.tensor([0]), torch.tensor([[5, 1]]), num_frames=3, size=8, speed=1
    )
    # left: x = 1, 0, 7 (wrapped) in row 5
    assert [tuple(torch.nonzero(f).tolist()[0]) for f in video[0]] == [(5, 1), (5, 0), (5, 7)]


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="digit"):
        md.prompt_for(10, "left")
    with pytest.raises(ValueError, match="direction"):
        md.prompt_for(1, "sideways")
    with pytest.raises(ValueError, match="glyphs"):
        md.moving_digit_videos(torch.zeros(2, 24, 24), torch.zeros(2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="num_frames"):
        md.moving_digit_videos(torch.zeros(1, 1, 4, 4), torch.zeros(1), torch.zeros(1, 2), num_frames=0)
    with pytest.raises(ValueError, match="videos"):
        md.classify_videos(torch.zeros(2, 64, 64))
    with pytest.raises(TypeError, match="videos"):
        md.measure_motion([[0.0]])
    with pytest.raises(TypeError, match="path"):
        md.load(3)
    with pytest.raises(ValueError, match="seed"):
        md.train(tmp_path, seed=-1)


@pytest.mark.slow
def test_train_smoke(tmp_path, monkeypatch):
    """A few steps of every training stage write a loadable pipeline and a model card (~1 min)."""
    monkeypatch.setattr(md, "_VAE_PHASES", ((2, 32, 5, 2), (1, md.SIZE, 5, 1)))
    monkeypatch.setattr(md, "_NUM_LATENT_VIDEOS", 16)
    monkeypatch.setattr(md, "_DIT_STEPS", 3)
    metrics = md.train(tmp_path, progress=False)
    assert 0.0 <= metrics["generated digit accuracy (40 videos)"] <= 1.0
    assert metrics["real held-out direction accuracy"] == 1.0
    pipe = md.load(tmp_path)
    assert len(pipe.vae.config.latents_mean) == pipe.transformer.config.in_channels
    assert "not a general-purpose model" in (tmp_path / "README.md").read_text()
