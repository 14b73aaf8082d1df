"""LlamaGen-style GPT: config validation, 2-D RoPE, state-dict names, checkpoint loading, KV cache."""

from __future__ import annotations

import argparse

import pytest
import torch

from mmaccel.tokenizers_img.gpt import GPT, GPTConfig, rope_2d
from mmaccel.tokenizers_img.orders import proximity_mask

TINY = dict(vocab_size=32, dim=32, n_layer=2, n_head=2, num_classes=4, multiple_of=16)


def tiny_gpt(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(dim=30), ValueError, "dim / n_head"),
        (dict(dim=24, n_head=4), ValueError, "divisible by 4"),
        (dict(n_layer=0), ValueError, "n_layer"),
        (dict(n_layer=1.5), TypeError, "n_layer"),
        (dict(column_blocks=-1), ValueError, "column_blocks"),
        (dict(model_type="x2i"), ValueError, "model_type"),
        (dict(cls_token_num=4), ValueError, "cls_token_num"),
        (dict(class_dropout_prob=1.0), ValueError, "class_dropout_prob"),
        (dict(n_kv_head=3), ValueError, "n_kv_head"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        GPTConfig(**{**TINY, **overrides})


def test_presets_and_ffn_width_match_llamagen() -> None:
    b = GPTConfig.preset("B")
    assert (b.n_layer, b.n_head, b.dim, b.ffn_hidden) == (12, 12, 768, 2048)
    assert GPTConfig.preset("XL").ffn_hidden == 3584
    with pytest.raises(ValueError, match="size"):
        GPTConfig.preset("Z")


def test_rope_2d_rows_and_columns() -> None:
    h, w, d, n_cond = 3, 5, 16, 2
    table = rope_2d(h, w, d, 10000.0, n_cond)
    assert table.shape == (n_cond + h * w, d // 2, 2)
    assert table[:n_cond].abs().sum() == 0  # LlamaGen: condition tokens get zero rotary entries
    grid = table[n_cond:].view(h, w, d // 2, 2)
    quarter = d // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(0, d // 2, 2).float() / (d // 2))
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(grid[i, j, :quarter, 0], torch.cos(i * freqs))
            torch.testing.assert_close(grid[i, j, quarter:, 1], torch.sin(j * freqs))


def test_state_dict_names_follow_llamagen_and_nar() -> None:
    keys = set(tiny_gpt().state_dict())
    expected = {
        "tok_embeddings.weight",
        "cls_embedding.embedding_table.weight",
        "layers.0.attention.wqkv.weight",
        "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "layers.2.attention.wqkv.weight",  # NAR's column block sits after the trunk
        "norm.weight",
        "output.weight",
        "medusa_norm.weight",
        "medusa_output.weight",
    }
    assert expected <= keys
    assert all("bias" not in k for k in keys)
    plain = set(tiny_gpt(column_blocks=0).state_dict())
    assert not any(k.startswith(("medusa", "layers.2.")) for k in plain)
    assert tiny_gpt().cls_embedding.embedding_table.num_embeddings == TINY["num_classes"] + 1  # null class


def _outputs(model: GPT) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    x = torch.cat([model.embed_condition(torch.tensor([2])), model.tok_embeddings(tokens)], dim=1)
    h_row, h_col = model.hidden(x, torch.arange(7), proximity_mask(2, 3, 1), (2, 3))
    return model.row_logits(h_row), model.column_logits(h_col)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix: str) -> None:
    model = tiny_gpt(seed=1)
    path = tmp_path / f"gpt{suffix}"
    model.save_checkpoint(path)
    loaded = GPT.from_checkpoint(path, model.config).eval()
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_save_pretrained_round_trip(tmp_path) -> None:
    model = tiny_gpt(seed=3, column_blocks=0, n_kv_head=1)
    model.save_pretrained(tmp_path / "gpt")
    assert sorted(p.name for p in (tmp_path / "gpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert loaded.config == model.config and not loaded.training
    mask = torch.ones(6, 6, dtype=torch.bool).tril()

    def logits(m: GPT) -> torch.Tensor:
        x = m.tok_embeddings(torch.arange(6)[None])
        return m.row_logits(m.hidden(x, torch.arange(1, 7), mask, (2, 3), column=False)[0])

    assert torch.equal(logits(model), logits(loaded))


def test_from_pretrained_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    tiny_gpt().save_pretrained(tmp_path / "gpt")
    (tmp_path / "gpt" / "config.json").write_text('{"dim": 32, "depth": 2}')
    with pytest.raises(ValueError, match="depth"):
        GPT.from_pretrained(tmp_path / "gpt")


def test_loads_llamagen_style_training_checkpoint(tmp_path) -> None:
    model = tiny_gpt(seed=2)
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["freqs_cis"] = torch.zeros(3)
    torch.save({"model": state, "steps": 10}, tmp_path / "ckpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "ckpt.pt", model.config).eval()
    assert torch.equal(_outputs(model)[0], _outputs(loaded)[0])


class _Opaque:
    """An arbitrary pickled object: not on the allow-list, so loading must refuse it."""


def test_loads_training_checkpoint_with_args_namespace(tmp_path) -> None:
    model = tiny_gpt(seed=3)
    args = argparse.Namespace(lr=1e-4, gpt_model="GPT-B", image_size=256)
    torch.save({"model": model.state_dict(), "args": args, "steps": 7}, tmp_path / "with_args.pt")
    loaded = GPT.from_checkpoint(tmp_path / "with_args.pt", model.config).eval()
    assert torch.equal(_outputs(model)[0], _outputs(loaded)[0])


def test_checkpoint_errors(tmp_path) -> None:
    model = tiny_gpt()
    torch.save({"model": model.state_dict(), "extra": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        GPT.from_checkpoint(tmp_path / "pickled.pt", model.config)
    model.save_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(RuntimeError, match="medusa"):  # a NAR checkpoint into a raster-only model
        GPT.from_checkpoint(tmp_path / "plain.safetensors", GPTConfig(**{**TINY, "column_blocks": 0}))


def test_condition_validation() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match="class labels"):
        model.embed_condition(torch.tensor([5]))
    with pytest.raises(ValueError, match="integer class labels"):
        model.embed_condition(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="no null class"):
        tiny_gpt(class_dropout_prob=0.0).null_condition(1)
    t2i = tiny_gpt(model_type="t2i", cls_token_num=3, caption_dim=8)
    assert t2i.embed_condition(torch.randn(2, 3, 8)).shape == (2, 3, 32)
    assert t2i.null_condition(2).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="caption features"):
        t2i.embed_condition(torch.randn(2, 4, 8))


def test_cached_forward_equals_full_forward() -> None:
    """Writing keys in two chunks at scattered raster positions equals one full forward."""
    model = tiny_gpt(n_kv_head=1)
    h, w = 2, 3
    mask = proximity_mask(h, w, 1)
    x = torch.cat(
        [model.embed_condition(torch.tensor([1])), model.tok_embeddings(torch.tensor([[3, 1, 4, 1, 5, 9]]))],
        1,
    )
    full_row, full_col = model.hidden(x, torch.arange(7), mask, (h, w))
    cache = model.new_cache(1, h, w)
    first = torch.tensor([0, 1, 2, 4])  # condition, diagonals 0 and 1
    model.hidden(x[:, first], first, mask[first][:, :5], (h, w), cache, 5)
    rest = torch.tensor([3, 5, 6])
    row, col = model.hidden(x[:, rest], rest, mask[rest], (h, w), cache, 7)
    torch.testing.assert_close(row, full_row[:, rest])
    torch.testing.assert_close(col, full_col[:, rest])
