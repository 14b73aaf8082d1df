"""FastV (vlm/fastv.py): the last-token attention row vs eager attention, the ranking, masking
through SDPA and eager alike, batched generate with a KV cache, validation."""

from __future__ import annotations

import copy

import pytest
import torch

from mmaccel.runtime.budget import TokenBudget
from mmaccel.testing import tiny_image, tiny_llava, tiny_llava_next
from mmaccel.vlm import FastVConfig, HiREDConfig, apply_fastv, apply_hired

PROMPTS = ["USER: <image>\nWhat is shown in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


def _inputs(processor, images, prompts):
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _batch(processor):
    return _inputs(processor, [tiny_image(64, 128, seed=1), tiny_image(128, 128, seed=2)], PROMPTS)


@pytest.mark.parametrize(
    "kwargs, err, word",
    [
        (dict(k=0), ValueError, "k"),
        (dict(k=1.0), TypeError, "k"),
        (dict(k=True), TypeError, "k"),
        (dict(budget=0.5), TypeError, "budget"),
        (dict(mode="drop"), ValueError, "mode"),
    ],
)
def test_config_rejects_bad_values(kwargs, err, word):
    with pytest.raises(err, match=word):
        FastVConfig(**kwargs)


def test_k_beyond_the_decoder_names_the_parameter(llava_next):
    model, _ = llava_next
    n = len(model.get_decoder().layers)
    with pytest.raises(ValueError, match=rf"k must be in \[1, {n - 1}\]"):
        apply_fastv(model, FastVConfig(k=n))
    assert "_mmaccel_patches" not in model.__dict__


def test_unsupported_model_raises_type_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=32))  # fmt: skip
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        apply_fastv(lm)


def _eager_ranking(model, inputs, k: int, budget: TokenBudget) -> torch.Tensor:
    """Reference: eager attention weights of layer k - 1, last row, heads averaged, top image positions."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    row = out.attentions[k - 1][:, :, -1, :].float().mean(1)
    is_image = inputs["input_ids"] == model.config.image_token_id
    dropped = torch.zeros_like(is_image)
    for b in range(row.shape[0]):
        idx = is_image[b].nonzero().squeeze(1)
        order = torch.sort(row[b, idx], descending=True, stable=True).indices
        dropped[b, idx[order[budget.resolve(idx.numel()) :]]] = True
    return dropped, row


@pytest.mark.parametrize("k", [1, 2])
def test_ranking_row_equals_eager_attention_on_sdpa_model(llava_next, k):
    model, processor = llava_next
    assert model.config.text_config._attn_implementation == "sdpa"
    inputs = _batch(processor)  # left padding: the mask row matters
    budget = TokenBudget(ratio=0.3)
    expected, eager_row = _eager_ranking(model, inputs, k, budget)
    with apply_fastv(model, FastVConfig(budget=budget, k=k)) as handle:
        with torch.no_grad():
            model(**inputs)
        assert torch.equal(handle.dropped, expected)
        s = handle.stats.summary()
    is_image = inputs["input_ids"] == model.config.image_token_id
    counts = is_image.sum(1).tolist()
    assert s["prefills"] == 1 and s["sequences"] == 2
    assert s["image_tokens_before"] == sum(counts)
    assert s["image_tokens_after"] == sum(budget.resolve(c) for c in counts)
    assert eager_row.shape[1] == inputs["input_ids"].shape[1]


def test_last_token_attention_matches_eager_weights(llava_next):
    from mmaccel.vlm.fastv import last_token_attention

    model, processor = llava_next
    inputs = _batch(processor)
    _, eager_row = _eager_ranking(model, inputs, 2, TokenBudget(ratio=0.5))
    seen = {}
    attn = model.get_decoder().layers[1].self_attn
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, a, o: seen.update(q=o[:, -1])),
        attn.k_proj.register_forward_hook(lambda m, a, o: seen.update(k=o)),
        attn.register_forward_hook(lambda m, a, kw, o: seen.update(kw=kw), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    b, n = seen["k"].shape[:2]
    hd = attn.head_dim
    cos, sin = seen["kw"]["position_embeddings"]
    mask = seen["kw"].get("attention_mask")
    row = last_token_attention(seen["q"].view(b, -1, hd), seen["k"].view(b, n, -1, hd), cos, sin, attn.scaling,
                               None if mask is None else mask[:, 0, -1, :n])  # fmt: skip
    torch.testing.assert_close(row, eager_row, atol=1e-6, rtol=1e-5)


def test_full_budget_is_the_dense_model(llava_next):
    model, processor = llava_next
    inputs = _batch(processor)
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    dense = model.generate(**inputs, **kw)
    with apply_fastv(model, FastVConfig(budget=TokenBudget(ratio=1.0))) as handle:
        out = model.generate(**inputs, **kw)
        assert not handle.dropped.any()
    assert torch.equal(out.sequences, dense.sequences)
    for a, b in zip(out.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_give_the_same_pruned_outputs(llava_next):
    """The mask edit works on SDPA's bool / None masks and eager's additive ones alike."""
    model, processor = llava_next
    inputs = _batch(processor)
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    config = FastVConfig(budget=TokenBudget(ratio=0.2))
    dense = model.generate(**inputs, **kw)
    with apply_fastv(model, config) as h1:
        sdpa = model.generate(**inputs, **kw)
        dropped = h1.dropped.clone()
    with apply_fastv(eager, config) as h2:
        ref = eager.generate(**inputs, **kw)
        assert torch.equal(h2.dropped, dropped)
    for a, b in zip(sdpa.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(sdpa.logits, dense.logits))  # it prunes


def test_single_sequences_without_padding_match_the_batch(llava_next):
    """Batch 1 has no padding (SDPA gets no mask: FastV builds the causal one)."""
    model, processor = llava_next
    images = [tiny_image(64, 128, seed=1), tiny_image(128, 128, seed=2)]
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    config = FastVConfig(budget=TokenBudget(ratio=0.3))
    with apply_fastv(model, config):
        batch = model.generate(**_inputs(processor, images, PROMPTS), **kw)
        singles = [model.generate(**_inputs(processor, [i], [p]), **kw) for i, p in zip(images, PROMPTS)]
    for b, single in enumerate(singles):
        assert torch.equal(batch.sequences[b, -4:], single.sequences[0, -4:])
        for step in range(4):
            torch.testing.assert_close(batch.logits[step][b], single.logits[step][0], atol=1e-4, rtol=1e-4)


def test_remove_restores_bit_for_bit_and_composes_after_hired(llava_next):
    model, processor = llava_next
    inputs = _batch(processor)
    with torch.no_grad():
        before = model(**inputs).logits
    hired = apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.5)))
    with apply_fastv(model, FastVConfig(budget=TokenBudget(ratio=0.5))) as handle:
        with pytest.raises(ValueError, match="already applied"):
            apply_fastv(model)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        # HiRED shrank the prompt before FastV saw it: FastV ranks the positions HiRED kept
        kept = sum(s.tokens_after for s in hired.last_selections)
        assert handle.stats.summary()["image_tokens_before"] == kept
    hired.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_llava_1_5_is_supported():
    model, processor = tiny_llava()
    inputs = _inputs(processor, [tiny_image(seed=0), tiny_image(seed=5)], PROMPTS)
    with apply_fastv(model, FastVConfig(budget=TokenBudget(count=4))) as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats.summary()["image_tokens_after"] == 8
        assert int(handle.dropped.sum()) == int((inputs["input_ids"] == model.config.image_token_id).sum()) - 8


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_prune_computes_only_the_kept_positions_and_equals_mask(llava_next, attn, ratio):
    """mode="prune" (layers k.. hold only the kept positions; rows of different image sizes keep
    different counts, so short rows are padded) gives the outputs of mode="mask"."""
    model, processor = llava_next
    if attn == "eager":
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
    inputs = _batch(processor)  # a 3- and a 5-partition image: ragged kept counts
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    budget = TokenBudget(ratio=ratio)
    with apply_fastv(model, FastVConfig(budget=budget, mode="mask")):
        masked = model.generate(**inputs, **kw)
    with apply_fastv(model, FastVConfig(budget=budget)) as handle:
        seen = []
        late = model.get_decoder().layers[2].self_attn
        hook = late.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
        try:
            pruned = model.generate(**inputs, **kw)
        finally:
            hook.remove()
        lengths = (~handle.dropped).sum(1)
    assert seen[0] == int(lengths.max()) < inputs["input_ids"].shape[1]  # layer 2 saw the kept positions only
    assert lengths[0] != lengths[1]
    assert torch.equal(pruned.sequences, masked.sequences)
    for a, b in zip(pruned.logits, masked.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["prune", "mask"])
def test_prefill_adds_one_host_read(llava_next, mode):
    """FastV's ranking, pruning and masking read nothing on the host but each prompt's image-token count."""
    from mmaccel.testing.hotpath import count_hot_path

    model, processor = llava_next
    inputs = _batch(processor)
    dense = count_hot_path(lambda: model(**inputs))
    with apply_fastv(model, FastVConfig(budget=TokenBudget(ratio=0.3), mode=mode)):
        fastv = count_hot_path(lambda: model(**inputs))
    added = fastv.sync_counts - dense.sync_counts
    assert added == {"tolist": 1}, (added, fastv.sync_counts, dense.sync_counts)
