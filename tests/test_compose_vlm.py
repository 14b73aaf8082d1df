"""HiRED + VISTA + attention rebalancing in one model (and each pair; greedy, sampling, beam
search, batch 2), torch.compile of the language model with HiRED active, and every VLM technique in bf16
(issue #17; the matrix is docs/compat.md). Tiny LLaVA-1.5, CPU."""

from __future__ import annotations

import pytest
import torch

from mmaccel.runtime.budget import TokenBudget
from mmaccel.testing import tiny_image, tiny_llava
from mmaccel.vlm import (
    AttentionBalanceConfig,
    HiREDConfig,
    VISTAConfig,
    apply_attention_balance,
    apply_hired,
    apply_vista,
    load_vlm,
)

IMAGES = [tiny_image(seed=1), tiny_image(seed=2)]
PROMPT = "What is shown in the image?"
ACTIVE = dict(hired=HiREDConfig(budget=TokenBudget(count=16)), vista=VISTAConfig(lam=0.5, gamma=0.3),
              attention_balance=AttentionBalanceConfig(start_layer=1))  # fmt: skip
NEUTRAL = dict(hired=HiREDConfig(budget=TokenBudget(ratio=1.0)), vista=VISTAConfig(lam=0.0, gamma=0.0),
               attention_balance=AttentionBalanceConfig(alpha=0.0, beta=0.0))  # fmt: skip
MODES = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=5, temperature=1.5),
         "beam": dict(do_sample=False, num_beams=2)}  # fmt: skip


def _ids(vlm, images, **kw):
    """Generated texts per sample, through ``VLM.generate`` (its batching and padding)."""
    out = vlm.generate(images, [PROMPT] * len(images), max_new_tokens=4, **kw)
    return out.texts


@pytest.fixture(scope="module")
def dense():
    model, processor = tiny_llava()
    return load_vlm(model, processor=processor)


PAIRS = {"hired+vista+balance": ("hired", "vista", "attention_balance"), "hired+vista": ("hired", "vista"),
         "vista+balance": ("vista", "attention_balance"), "hired+balance": ("hired", "attention_balance")}  # fmt: skip


def _pick(settings, names):
    return {k: v for k, v in settings.items() if k in names}


def test_balance_with_hired_uses_the_kept_tokens_streams():
    """With HiRED, rebalancing picks its streams over the whole image (as without HiRED) and
    boosts HiRED's kept positions with exactly their entries of those streams."""
    model, processor = tiny_llava()
    vlm = load_vlm(model, processor=processor, **_pick(ACTIVE, ("hired", "attention_balance")))
    vlm.generate(IMAGES, [PROMPT] * 2, max_new_tokens=2)
    seq = vlm.balance.balance.current
    keeps = [s.keep for s in vlm.handle.last_selections]
    assert [int(k.sum()) for k in keeps] == [16, 16] and [k.numel() for k in keeps] == [64, 64]
    cfg = ACTIVE["attention_balance"]
    for row, (streams, keep) in enumerate(zip(vlm.balance.last_streams, keeps)):
        expected = cfg.alpha * streams.local[keep].float() + cfg.beta * streams.summary[keep].float()
        torch.testing.assert_close(seq.weights[row][seq.is_image[row]], expected)
        assert int(seq.is_image[row].sum()) == 16


@pytest.mark.parametrize("pair", list(PAIRS))
def test_neutral_settings_together_equal_dense(dense, pair):
    model, processor = tiny_llava()
    vlm = load_vlm(model, processor=processor, **_pick(NEUTRAL, PAIRS[pair]))
    assert [vlm.handle is not None, vlm.vista is not None, vlm.balance is not None] == [
        name in PAIRS[pair] for name in ("hired", "vista", "attention_balance")
    ]
    for mode, kw in MODES.items():
        if mode == "sampling":
            continue  # compared below under a fixed seed
        assert _ids(vlm, IMAGES, **kw) == _ids(dense, IMAGES, **kw), mode


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pair", list(PAIRS))
def test_techniques_together(dense, pair, mode):
    model, processor = tiny_llava()
    vlm = load_vlm(model, processor=processor, **_pick(ACTIVE, PAIRS[pair]))
    kw = MODES[mode]
    torch.manual_seed(0)
    batch = _ids(vlm, IMAGES, **kw)
    assert len(batch) == 2
    # every technique ran on every sample of the batch
    if vlm.handle is not None:
        assert [s.tokens_after for s in vlm.handle.last_selections] == [16, 16]
    if vlm.balance is not None:
        assert vlm.balance.stats.summary()["images"] >= 2 and vlm.balance.stats.summary()["modulated_rows"] > 0
    if vlm.vista is not None:
        vista = vlm.vista.stats.summary()
        assert vista["vectors_computed"] >= 1 and vista["steered_forwards"] > 0 and vista["sla_mixes"] > 0
    if mode != "sampling":  # deterministic: each sample equals itself run alone (batch independence)
        assert batch == [_ids(vlm, [im], **kw)[0] for im in IMAGES]
    else:  # the same seed reproduces the batch
        torch.manual_seed(0)
        assert _ids(vlm, IMAGES, **kw) == batch
    # removing them (any order) leaves the dense model
    vlm.remove_vista()
    vlm.remove_hired()
    vlm.remove_attention_balance()
    assert "_mmaccel_hired" not in model.__dict__
    torch.manual_seed(0)
    restored = _ids(vlm, IMAGES, **kw)
    torch.manual_seed(0)
    assert restored == _ids(dense, IMAGES, **kw)
    assert "_mmaccel_patches" not in model.__dict__


def test_compiled_language_model_with_hired_equals_eager():
    model, processor = tiny_llava()
    vlm = load_vlm(model, processor=processor, hired=ACTIVE["hired"])
    eager = vlm.generate(IMAGES, [PROMPT] * 2, max_new_tokens=4)
    inputs = processor(images=IMAGES, text=[vlm.format_prompt(PROMPT)] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        eager_logits = model(**inputs).logits
    torch._dynamo.reset()
    try:
        model.model.language_model.compile(backend="aot_eager")
        compiled = vlm.generate(IMAGES, [PROMPT] * 2, max_new_tokens=4)
        with torch.no_grad():
            compiled_logits = model(**inputs).logits
    finally:
        torch._dynamo.reset()
    assert compiled.texts == eager.texts
    assert [s.visual_tokens_after for s in compiled.stats] == [16, 16]
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)


# -- bf16 -------------------------------------------------------------------------------------

#: bf16 logits of the tiny LLaVA are O(1); a reordered but equivalent computation stays within a
#: few bf16 ulps.
BF16_ATOL = 0.05


@pytest.fixture(scope="module")
def bf16():
    model, processor = tiny_llava(dtype=torch.bfloat16)
    inputs = processor(images=IMAGES, text=[f"USER: <image>\n{PROMPT} ASSISTANT:"] * 2, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        dense = model(**inputs).logits
    return model, inputs, dense


@pytest.mark.parametrize(
    "apply,neutral,active",
    [
        (apply_hired, NEUTRAL["hired"], ACTIVE["hired"]),
        (apply_vista, NEUTRAL["vista"], ACTIVE["vista"]),
        (apply_attention_balance, NEUTRAL["attention_balance"], ACTIVE["attention_balance"]),
    ],
    ids=["hired", "vista", "attention_balance"],
)
def test_bf16(bf16, apply, neutral, active):
    model, inputs, dense = bf16
    assert dense.dtype == torch.bfloat16
    with torch.no_grad():
        with apply(model, neutral):
            torch.testing.assert_close(model(**inputs).logits, dense, rtol=0, atol=BF16_ATOL)
        with apply(model, active):
            out = model(**inputs).logits
        assert torch.isfinite(out).all() and out.dtype == torch.bfloat16
        if apply is not apply_hired:  # HiRED shortens the sequence: compare the last position
            assert not torch.equal(out, dense)
        else:
            assert out.shape[1] < dense.shape[1]
        assert torch.equal(model(**inputs).logits, dense)
