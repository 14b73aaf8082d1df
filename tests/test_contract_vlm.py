"""The technique contract (docs/architecture.md) for HiRED, FastV, VISTA and attention rebalancing,
checked by ``mmaccel.testing.check_technique_contract`` on the tiny LLaVA / LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch

from mmaccel.testing import check_technique_contract, tiny_image, tiny_llava, tiny_llava_next
from mmaccel.vlm import (
    AttentionBalanceConfig,
    AttentionBalanceHandle,
    FastVConfig,
    FastVHandle,
    HiREDConfig,
    HiREDHandle,
    VISTAConfig,
    VISTAHandle,
    apply_attention_balance,
    apply_fastv,
    apply_hired,
    apply_vista,
)

PROMPTS = [
    "USER: <image>\nWhat is shown in the image? ASSISTANT:",
    "USER: <image>\nDescribe the picture. ASSISTANT:",
]
TECHNIQUES = {
    "hired": (HiREDConfig, apply_hired, HiREDHandle),
    "fastv": (FastVConfig, apply_fastv, FastVHandle),
    "vista": (VISTAConfig, apply_vista, VISTAHandle),
    "attention_balance": (AttentionBalanceConfig, apply_attention_balance, AttentionBalanceHandle),
}
CASES = [
    ("hired", "llava"),
    ("hired", "llava_next"),
    ("fastv", "llava"),
    ("fastv", "llava_next"),
    ("vista", "llava"),
    ("vista", "llava_next"),
    ("attention_balance", "llava"),  # LLaVA-NeXT is refused (NotImplementedError), see its docs
]


def _greedy_run(model, processor, which):
    processor.tokenizer.padding_side = "left"
    sizes = [(64, 64), (64, 128)] if which == "llava" else [(128, 128), (64, 128)]
    images = [tiny_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)

    def run():
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )

    return run


@pytest.mark.parametrize(("technique", "which"), CASES, ids=[f"{t}-{w}" for t, w in CASES])
def test_technique_contract(technique, which):
    model, processor = (tiny_llava if which == "llava" else tiny_llava_next)()
    config_cls, apply, handle_cls = TECHNIQUES[technique]
    summary = check_technique_contract(config_cls, apply, handle_cls, model, _greedy_run(model, processor, which))
    assert summary  # plain numbers, checked by the contract; a few technique-specific facts:
    if technique == "hired":
        assert summary["images"] == 2 and 0 < summary["kept_ratio"] < 1
    elif technique == "fastv":
        assert summary["prefills"] == 1 and summary["sequences"] == 2 and 0 < summary["kept_ratio"] < 1
    elif technique == "vista":
        assert summary["vectors_computed"] == 1 and summary["sla_mixes"] >= 4
    else:
        assert summary["images"] == 2 and summary["modulated_rows"] > 0


def test_stats_reset_forgets_what_was_recorded():
    model, processor = tiny_llava_next()
    run = _greedy_run(model, processor, "llava_next")
    with apply_hired(model) as handle:
        run()
        assert handle.stats.summary()["images"] == 2
        handle.stats.reset()
        assert handle.stats.summary() == {
            "encodes": 0, "images": 0, "partitions": 0, "visual_tokens_before": 0, "visual_tokens_after": 0,
            "kept_ratio": None, "crop_budget_min": None, "crop_budget_max": None,
        }  # fmt: skip


def test_fastv_stats_reset_forgets_what_was_recorded():
    model, processor = tiny_llava_next()
    run = _greedy_run(model, processor, "llava_next")
    with apply_fastv(model) as handle:
        run()
        assert handle.stats.summary()["sequences"] == 2
        handle.stats.reset()
        assert handle.stats.summary() == {
            "prefills": 0, "sequences": 0, "image_tokens_before": 0, "image_tokens_after": 0, "kept_ratio": None,
        }  # fmt: skip
