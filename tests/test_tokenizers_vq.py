"""LlamaGen-architecture VQ tokenizer: shapes, codebook lookup, checkpoints, errors, training."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from mmaccel.tokenizers_img.train_tokenizer import load_images, main, psnr, sample_crops, train_step
from mmaccel.tokenizers_img.vq import VQConfig, VQModel

TINY = dict(
    codebook_size=32,
    codebook_embed_dim=4,
    ch=16,
    norm_groups=8,
    encoder_ch_mult=(1, 2),
    decoder_ch_mult=(1, 2),
    z_channels=8,
    num_res_blocks=1,
)


@pytest.fixture(scope="module")
def model() -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_decode_shapes_non_square(model: VQModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        indices = model.encode(images)
        assert indices.shape == (2, 4, 6) and indices.dtype == torch.long
        assert 0 <= int(indices.min()) and int(indices.max()) < 32
        decoded = model.decode(indices)
        assert decoded.shape == images.shape
        # forward (straight-through) reconstructs exactly what decode(encode(x)) gives
        torch.testing.assert_close(model(images).reconstruction, decoded)
        # flat indices with an explicit grid decode the same
        torch.testing.assert_close(model.decode(indices.flatten(1), grid=(4, 6)), decoded)


def test_encode_picks_nearest_l2_normalised_code(model: VQModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        z = F.normalize(rearrange(model.quant_conv(model.encoder(images)), "b c h w -> (b h w) c"), dim=-1)
        codes = F.normalize(model.quantize.embedding.weight, dim=-1)
        dist = torch.cdist(z, codes)
        chosen = model.encode(images).flatten()
        torch.testing.assert_close(
            dist.gather(1, chosen[:, None])[:, 0], dist.min(1).values, atol=1e-5, rtol=0
        )
        assert (chosen == dist.argmin(1)).float().mean() > 0.9
        looked_up = model.codebook_lookup(chosen.view(2, 4, 6))
        torch.testing.assert_close(looked_up, rearrange(codes[chosen], "(b h w) c -> b c h w", b=2, h=4))


def test_llamagen_state_dict_names_and_vq16_size() -> None:
    keys = set(
        VQModel(VQConfig(**{**TINY, "encoder_ch_mult": (1, 1, 2), "decoder_ch_mult": (1, 1, 2)})).state_dict()
    )
    for name in (
        "encoder.conv_in.weight",
        "encoder.conv_blocks.0.res.0.conv1.weight",
        "encoder.conv_blocks.1.downsample.conv.weight",
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.2.attn.0.q.weight",
        "encoder.mid.1.proj_out.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "quantize.embedding.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid.0.norm1.weight",
        "decoder.conv_blocks.0.attn.1.k.weight",
        "decoder.conv_blocks.0.upsample.conv.weight",
        "decoder.conv_blocks.2.res.1.conv2.weight",
        "decoder.conv_out.bias",
    ):
        assert name in keys, name
    assert not any(
        k.startswith("encoder.conv_blocks.2.downsample") or k.startswith("decoder.conv_blocks.2.upsample")
        for k in keys
    )
    assert not any(k.startswith("encoder.conv_blocks.0.attn") for k in keys)
    with torch.device("meta"):
        vq16 = VQModel(VQConfig.vq_16())
    assert vq16.downsample_factor == 16 and vq16.quantize.embedding.weight.shape == (16384, 8)
    # LlamaGen reports 72M parameters for VQ-16
    assert 71.5e6 < sum(p.numel() for p in vq16.parameters()) < 72.5e6
    assert VQConfig.vq_8().downsample_factor == 8


def _same_outputs(a: VQModel, b: VQModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        ia, ib = a.encode(images), b.encode(images)
        assert torch.equal(ia, ib)
        assert torch.equal(a.decode(ia), b.decode(ib))


def test_save_pretrained_round_trip(model: VQModel, images: torch.Tensor, tmp_path) -> None:
    model.save_pretrained(tmp_path / "vq")
    assert {p.name for p in (tmp_path / "vq").iterdir()} == {"config.json", "model.safetensors"}
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config
    _same_outputs(model, loaded, images)
    _same_outputs(model, VQModel.from_pretrained(tmp_path / "vq" / "model.safetensors"), images)


def test_llamagen_style_torch_checkpoint(model: VQModel, images: torch.Tensor, tmp_path) -> None:
    # LlamaGen training checkpoints: {"model": ..., "args": Namespace, "steps": ...}, with a usage buffer
    state = {**model.state_dict(), "quantize.codebook_used": torch.zeros(65536)}
    path = tmp_path / "vq_ds_tiny.pt"
    torch.save({"model": state, "steps": 3, "args": argparse.Namespace(vq_model="VQ-tiny")}, path)
    _same_outputs(model, VQModel.from_pretrained(path, config=VQConfig(**TINY)), images)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    _same_outputs(model, VQModel.from_pretrained(tmp_path / "plain.pth", config=VQConfig(**TINY)), images)
    with pytest.raises(ValueError, match="config"):
        VQModel.from_pretrained(path)
    with pytest.raises(ValueError, match="does not match"):
        VQModel.from_pretrained(path, config=VQConfig(**{**TINY, "codebook_size": 64}))
    with pytest.raises(FileNotFoundError):
        VQModel.from_pretrained(tmp_path / "missing.pt", config=VQConfig(**TINY))


def test_config_from_llamagen_model_args() -> None:
    args = dict(
        codebook_size=32,
        codebook_embed_dim=4,
        codebook_l2_norm=True,
        codebook_show_usage=True,
        commit_loss_beta=0.25,
        entropy_loss_ratio=0.0,
        encoder_ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        z_channels=8,
        dropout_p=0.0,
    )
    config = VQConfig.from_dict(args)
    assert config.encoder_ch_mult == (1, 2) and config.downsample_factor == 2
    assert VQConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        VQConfig.from_dict({**args, "bogus": 1})


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        ({"codebook_size": 0}, ValueError, "codebook_size"),
        ({"codebook_embed_dim": 2.0}, TypeError, "codebook_embed_dim"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"commit_loss_beta": -1.0}, ValueError, "commit_loss_beta"),
        ({"encoder_ch_mult": ()}, TypeError, "encoder_ch_mult"),
        ({"decoder_ch_mult": (1, 0)}, ValueError, "decoder_ch_mult"),
        ({"ch": 12}, ValueError, "norm_groups"),
        ({"decoder_ch_mult": (1, 2, 2)}, ValueError, "same length"),
        ({"codebook_l2_norm": 1}, TypeError, "codebook_l2_norm"),
    ],
)
def test_config_validation(overrides: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        VQConfig(**{**TINY, **overrides})


def test_bad_inputs_raise_clear_errors(model: VQModel, images: torch.Tensor) -> None:
    indices = model.encode(images)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full_like(indices, 32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(indices - 100)
    with pytest.raises(TypeError, match="integer"):
        model.decode(indices.float())
    with pytest.raises(ValueError, match="grid"):
        model.decode(indices.flatten(1), grid=(5, 5))
    with pytest.raises(ValueError, match="grid"):
        model.decode(indices.flatten(1))
    with pytest.raises(ValueError, match="does not match"):
        model.decode(indices, grid=(6, 4))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(images[..., :7])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(images[:, :1])
    with pytest.raises(TypeError, match="float"):
        model.encode((images * 100).long())
    with pytest.raises(ValueError, match="codes"):
        model.decode_codes(torch.zeros(1, 5, 2, 2))


def test_training_steps_reduce_loss_on_real_images() -> None:
    torch.manual_seed(0)
    crops = sample_crops(
        load_images("skimage", "eval", short_side=48), 4, 16, torch.Generator().manual_seed(0)
    )
    model = VQModel(VQConfig(**TINY))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = [train_step(model, optimizer, crops) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0]
    before = psnr(VQModel(VQConfig(**TINY)).eval()(crops).reconstruction, crops)
    assert psnr(model.eval()(crops).reconstruction, crops) > before


def test_psnr_and_image_loading() -> None:
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x, x) == float("inf")
    assert psnr(x + 0.02, x) == pytest.approx(10 * torch.log10(torch.tensor(4.0 / 4e-4)).item(), rel=1e-4)
    digits = load_images("digits", "eval")
    assert len(digits) == 297 and digits[0].shape == (3, 8, 8)
    assert min(float(d.min()) for d in digits) >= -1 and max(float(d.max()) for d in digits) <= 1
    photos = load_images("skimage", "eval", short_side=32)
    assert photos[0].shape[0] == 3 and min(photos[0].shape[1:]) == 32
    with pytest.raises(ValueError, match="source"):
        load_images("imagenet", "train")


def test_train_script_cli(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--model" in capsys.readouterr().out
    report = main(
        [
            "--model",
            "vq",
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
            str(tmp_path / "vq"),
        ]
    )
    assert len(report.losses) == 2 and "psnr" in report.psnr_after
    assert VQModel.from_pretrained(tmp_path / "vq").downsample_factor == 4


def test_attention_block_matches_llamagen_formula() -> None:
    """AttnBlock uses SDPA; LlamaGen writes it as bmm + softmax(q k^T / sqrt(C)) -- same numbers."""
    from mmaccel.tokenizers_img.vq import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(16, groups=8)
    x = torch.randn(2, 16, 3, 5)
    h = block.norm(x)
    q = block.q(h).flatten(2).transpose(1, 2)
    k = block.k(h).flatten(2)
    v = block.v(h).flatten(2)
    w = torch.softmax(torch.bmm(q, k) * 16**-0.5, dim=2)
    expected = x + block.proj_out(torch.bmm(v, w.transpose(1, 2)).reshape(2, 16, 3, 5))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_dead_code_restart_reseeds_unused_codes_in_training_only() -> None:
    from mmaccel.tokenizers_img.vq import VectorQuantizer

    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, 0.25, 0.0, l2_norm=True, restart_every=2)
    z = F.normalize(torch.randn(64, 4), dim=-1)
    before = quantizer.embedding.weight.detach().clone()
    quantizer.eval()
    for _ in range(3):
        quantizer(z)
    assert torch.equal(quantizer.embedding.weight, before)
    quantizer.train()
    _, first, _ = quantizer(z)  # counts usage
    quantizer(z)  # second call: codes unused by the first call are reset to rows of z
    weight = quantizer.embedding.weight.detach()
    unused = sorted(set(range(16)) - set(first.tolist()))
    assert unused and torch.equal(weight[first.unique()], before[first.unique()])
    for i in unused:
        assert torch.isclose(torch.cdist(weight[i : i + 1], z), torch.tensor(0.0), atol=1e-6).any()
    with pytest.raises(ValueError, match="dead_code_restart"):
        VQConfig(**TINY, dead_code_restart=-1)
