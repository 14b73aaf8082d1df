"""1-D compact tokenizer: prefix decoding, causal latents, FSQ/VQ, checkpoints, errors, training."""

import pytest
import torch

from mmaccel.tokenizers_img.compact_1d import Compact1DConfig, Compact1DTokenizer, FSQuantizer
from mmaccel.tokenizers_img.train_tokenizer import load_images, main, sample_crops, train_step

TINY = dict(
    image_size=8,
    patch_size=2,
    width=32,
    encoder_depth=2,
    decoder_depth=1,
    num_heads=2,
    num_latent_tokens=6,
    fsq_levels=(5, 4, 3),
    codebook_size=16,
    token_dim=4,
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module", params=["fsq", "vq"])
def model(request) -> Compact1DTokenizer:
    torch.manual_seed(0)
    return Compact1DTokenizer(Compact1DConfig(**TINY, quantizer=request.param)).eval()


def test_encode_shape_and_every_prefix_decodes(model: Compact1DTokenizer, images: torch.Tensor) -> None:
    vocab = 60 if model.config.quantizer == "fsq" else 16
    assert model.config.vocab_size == vocab
    with torch.no_grad():
        indices = model.encode(images)
        assert indices.shape == (3, 6) and indices.dtype == torch.long
        assert 0 <= int(indices.min()) and int(indices.max()) < vocab
        outputs = []
        for k in range(1, 7):
            decoded = model.decode(indices[:, :k])
            assert decoded.shape == images.shape and torch.isfinite(decoded).all()
            # the training path (all tokens present, the ones after k hidden by the attention mask)
            # reconstructs exactly what decoding the k-token prefix gives
            recon, _ = model(images, prefix_lengths=torch.full((3,), k))
            torch.testing.assert_close(recon, decoded, atol=1e-5, rtol=1e-5)
            outputs.append(decoded)
        # mixed prefix lengths in one batch match the per-length decodes
        recon, loss = model(images, prefix_lengths=torch.tensor([1, 4, 6]))
        for b, k in enumerate((1, 4, 6)):
            torch.testing.assert_close(recon[b], outputs[k - 1][b], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(outputs[0], outputs[-1])


def test_latent_tokens_are_causal(model: Compact1DTokenizer, images: torch.Tensor) -> None:
    """Token i depends on the image and tokens < i only, so a prefix never changes when K grows."""
    with torch.no_grad():
        z = model._latents(images)
        saved = model.latent_tokens.detach().clone()
        try:
            model.latent_tokens[3] += torch.randn(
                model.config.width
            )  # (a constant would vanish in LayerNorm)
            z2 = model._latents(images)
        finally:
            model.latent_tokens.copy_(saved)
    torch.testing.assert_close(z2[:, :3], z[:, :3])
    assert not torch.allclose(z2[:, 3:], z[:, 3:])


def test_fsq_indices_round_trip_and_straight_through() -> None:
    fsq = FSQuantizer((5, 4, 3))
    ids = torch.arange(60)
    codes = fsq.lookup(ids)
    assert codes.shape == (60, 3) and codes.abs().max() <= 1
    assert len({tuple(c.tolist()) for c in codes}) == 60
    z = torch.randn(4, 7, 3, requires_grad=True) * 3
    z.retain_grad()
    quantized, indices, _ = fsq(z)
    torch.testing.assert_close(fsq.lookup(indices), quantized.detach())
    quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vq_variant_uses_nearest_normalised_code() -> None:
    torch.manual_seed(0)
    model = Compact1DTokenizer(Compact1DConfig(**TINY, quantizer="vq")).eval()
    z = torch.nn.functional.normalize(model._latents(torch.zeros(1, 3, 8, 8)).detach(), dim=-1)[0]
    codes = torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1)
    chosen = model.encode(torch.zeros(1, 3, 8, 8))[0]
    dist = torch.cdist(z, codes)
    torch.testing.assert_close(dist.gather(1, chosen[:, None])[:, 0], dist.min(1).values, atol=1e-5, rtol=0)


def test_round_trip_checkpoint(model: Compact1DTokenizer, images: torch.Tensor, tmp_path) -> None:
    model.save_pretrained(tmp_path / "tok")
    loaded = Compact1DTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    with torch.no_grad():
        ids = model.encode(images)
        assert torch.equal(loaded.encode(images), ids)
        assert torch.equal(loaded.decode(ids[:, :2]), model.decode(ids[:, :2]))
    (tmp_path / "tok" / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        Compact1DTokenizer.from_pretrained(tmp_path / "tok")


def test_bad_inputs_raise_clear_errors(model: Compact1DTokenizer, images: torch.Tensor) -> None:
    ids = model.encode(images)
    with pytest.raises(ValueError, match="1 <= k <= 6"):
        model.decode(torch.cat([ids, ids[:, :1]], 1))
    with pytest.raises(ValueError, match="1 <= k <= 6"):
        model.decode(ids[:, :0])
    with pytest.raises(ValueError, match=r"\[0, "):
        model.decode(ids + model.config.vocab_size)
    with pytest.raises(TypeError, match="integer"):
        model.decode(ids.float())
    with pytest.raises(ValueError, match="8x8"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(images, prefix_lengths=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        ({"image_size": 9}, ValueError, "patch_size"),
        ({"num_heads": 5}, ValueError, "num_heads"),
        ({"quantizer": "lfq"}, ValueError, "quantizer"),
        ({"fsq_levels": (5, 1)}, ValueError, r"fsq_levels\[1\]"),
        ({"num_latent_tokens": 0}, ValueError, "num_latent_tokens"),
        ({"mlp_ratio": -1.0}, ValueError, "mlp_ratio"),
        ({"nested_dropout": 1}, TypeError, "nested_dropout"),
    ],
)
def test_config_validation(overrides: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        Compact1DConfig(**{**TINY, **overrides})


def test_nested_dropout_samples_prefixes_and_training_reduces_loss() -> None:
    torch.manual_seed(0)
    crops = sample_crops(
        load_images("skimage", "eval", short_side=32), 8, 8, torch.Generator().manual_seed(0)
    )
    model = Compact1DTokenizer(Compact1DConfig(**TINY))
    model.train()
    lengths = torch.cat([model(crops)[1].prefix_lengths for _ in range(5)])
    assert lengths.min() >= 1 and lengths.max() <= 6 and len(set(lengths.tolist())) > 1
    model.eval()
    assert (model(crops)[1].prefix_lengths == 6).all()

    def full_and_short_loss() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            full = model(crops, prefix_lengths=torch.full((8,), 6))[1].reconstruction.item()
            short = model(crops, prefix_lengths=torch.full((8,), 1))[1].reconstruction.item()
        return full, short

    before = full_and_short_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        train_step(model, optimizer, crops)
    after = full_and_short_loss()
    assert after[0] < 0.7 * before[0] and after[1] < 0.7 * before[1]


def test_train_script_cli_compact(tmp_path) -> None:
    report = main(
        [
            "--model",
            "compact1d",
            "--data",
            "digits",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--image-size",
            "8",
            "--eval-size",
            "2",
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert len(report.losses) == 2 and "k=32" in report.psnr_after and "k=1" in report.psnr_after
    assert Compact1DTokenizer.from_pretrained(tmp_path / "c").config.num_latent_tokens == 32
