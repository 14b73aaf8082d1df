"""Zoo entry digits-nar: committed VQ tokenizer + NAR / raster GPTs load and still work."""

from __future__ import annotations

import pytest
import torch

from mmaccel.apps.zoo import digits_nar, zoo_path
from mmaccel.apps.zoo.card import DISCLAIMER
from mmaccel.apps.zoo.digits import classifier_accuracy, digit_images, digit_split, load_digit_classifier
from mmaccel.runtime.metrics import psnr
from mmaccel.tokenizers_img.gpt import GPT
from mmaccel.tokenizers_img.vq import VQModel

# Thresholds: the measured values with margin (see the model card in apps/zoo/models/digits-nar).
MIN_PSNR_DB = 28.0  # measured: 30.41 dB on these 64 test digits (30.48 on all 360)
MIN_NAR_ACCURACY = 0.7  # measured: 0.95 on these 20 samples


@pytest.fixture(scope="module")
def models() -> digits_nar.DigitsNAR:
    return digits_nar.load()


def test_folders_load_with_from_pretrained(models: digits_nar.DigitsNAR) -> None:
    root = zoo_path(digits_nar.NAME)
    assert DISCLAIMER in (root / "README.md").read_text()
    tokenizer = VQModel.from_pretrained(root / "tokenizer")
    nar, raster = GPT.from_pretrained(root / "nar"), GPT.from_pretrained(root / "raster")
    assert (nar.config.column_blocks, raster.config.column_blocks) == (1, 0)
    assert len(nar.layers) == len(raster.layers)
    for loaded, ref in ((tokenizer, models.tokenizer), (nar, models.nar), (raster, models.raster)):
        assert not ref.training
        for (k, a), (_, b) in zip(loaded.state_dict().items(), ref.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


def test_vq_round_trip_psnr(models: digits_nar.DigitsNAR) -> None:
    images, _ = digit_images(32)
    test = images[digit_split()[1][:64]]
    with torch.no_grad():
        tokens = models.tokenizer.encode(test * 2 - 1)
        recon = ((models.tokenizer.decode(tokens) + 1) / 2).clamp(0, 1)
    assert tokens.shape == (64, digits_nar.GRID, digits_nar.GRID)
    assert psnr(recon, test, data_range=1.0) >= MIN_PSNR_DB


def test_nar_samples_show_the_requested_digit(models: digits_nar.DigitsNAR) -> None:
    want = torch.arange(10).repeat(2)
    images, out = digits_nar.generate(models, want, "nar", generator=torch.Generator().manual_seed(0))
    assert images.shape == (20, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert out.forward_passes == 2 * digits_nar.GRID - 1
    assert classifier_accuracy(load_digit_classifier(), images, want) >= MIN_NAR_ACCURACY


def test_raster_needs_one_forward_per_token(models: digits_nar.DigitsNAR) -> None:
    want = torch.tensor([3, 7])
    _, raster = digits_nar.generate(models, want, "raster", generator=torch.Generator().manual_seed(0))
    _, nar = digits_nar.generate(models, want, "nar", generator=torch.Generator().manual_seed(0))
    assert (raster.forward_passes, nar.forward_passes) == (64, 15)
    assert raster.tokens.shape == nar.tokens.shape == (2, 8, 8)


def test_bad_input_raises(models: digits_nar.DigitsNAR) -> None:
    with pytest.raises(ValueError, match="order"):
        digits_nar.generate(models, torch.tensor([1]), "zigzag")
    with pytest.raises(ValueError, match="labels"):
        digits_nar.generate(models, torch.tensor([10]))  # 10 is the null class, not a digit
    with pytest.raises(TypeError, match="labels"):
        digits_nar.generate(models, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="samples_per_class"):
        digits_nar.evaluate(models, samples_per_class=0)
    with pytest.raises(TypeError, match="dtype"):
        digits_nar.load(dtype=torch.int64)
    with pytest.raises(ValueError, match="order"):
        digits_nar.gpt_config("diagonal")
