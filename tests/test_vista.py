"""VISTA: config checks, VSV / injection / SLA against manual computations, generate, HiRED, remove."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmaccel.testing import tiny_image, tiny_llava, tiny_llava_next
from mmaccel.vlm.hired import HiREDConfig, apply_hired
from mmaccel.vlm.vista import (
    VISTAConfig,
    apply_vista,
    compute_steering_vectors,
    negative_inputs,
    steer,
    window_layers,
)

PROMPTS = [
    "USER: <image>\nWhat is shown in the image? ASSISTANT:",
    "USER: <image>\nHow many cat are there in this picture? ASSISTANT:",
]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def _inputs(processor, n=2, prompts=PROMPTS):
    processor.tokenizer.padding_side = "left"
    images = [tiny_image(seed=i) for i in range(n)]
    return processor(images=images, text=list(prompts[:n]), return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


# -- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "err", "word"),
    [
        (dict(gamma=1.5), ValueError, "gamma"),
        (dict(gamma=-0.1), ValueError, "gamma"),
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(lam=-0.1), ValueError, "lam"),
        (dict(lam=float("inf")), ValueError, "lam"),
        (dict(lam="0.1"), TypeError, "lam"),
        (dict(window=(0.9, 0.5)), ValueError, "window"),
        (dict(window=(0.5, 1.5)), ValueError, "window"),
        (dict(window=0.5), TypeError, "window"),
        (dict(layers=(3, 1)), ValueError, "layers"),
        (dict(layers=(-1, 2)), ValueError, "layers"),
        (dict(layers=(1.0, 2)), TypeError, "layers"),
        (dict(sla_final_norm=1), TypeError, "sla_final_norm"),
    ],
)
def test_config_rejects_bad_values(kwargs, err, word):
    with pytest.raises(err, match=word):
        VISTAConfig(**kwargs)


def test_window_is_relative_to_depth_and_checked_against_it(llava):
    # the reference's "25,30" indexes hidden_states[1:]: 0-based decoder layers 25..30 of 32
    assert window_layers(VISTAConfig(), 32) == (25, 30)
    assert window_layers(VISTAConfig(), 4) == (2, 2)  # late but never the last layer
    assert window_layers(VISTAConfig(layers=(1, 3)), 4) == (1, 3)
    model, _ = llava
    with pytest.raises(ValueError, match="layers"):
        apply_vista(model, VISTAConfig(layers=(2, 4)))  # the tiny LM has 4 layers
    assert "_mmaccel_patches" not in model.__dict__


# -- exactness and restore -----------------------------------------------------------------
def test_zero_strengths_reproduce_the_model_and_remove_restores_bitwise(llava):
    model, processor = llava
    inputs = _inputs(processor)
    ref = _logits(model, inputs)
    with torch.no_grad():
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keys = set(model.__dict__)
    hooks = _hook_counts(model)
    with apply_vista(model, VISTAConfig(lam=0.0, gamma=0.0)):
        assert torch.equal(_logits(model, inputs), ref)
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
    handle = apply_vista(model, VISTAConfig(lam=1.0, gamma=0.5))
    assert not torch.allclose(_logits(model, inputs), ref)
    handle.remove()
    assert torch.equal(_logits(model, inputs), ref)
    assert set(model.__dict__) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _hook_counts(model) == hooks


def test_double_application_and_wrong_config_type_are_rejected(llava):
    model, _ = llava
    with apply_vista(model):
        with pytest.raises(ValueError, match="already applied"):
            apply_vista(model)
    with pytest.raises(TypeError, match="VISTAConfig"):
        apply_vista(model, {"lam": 0.1})


# -- VSV -------------------------------------------------------------------------------------
def _manual_last_layer_outputs(model, input_ids, pixel_values=None):
    """One unpadded sample: every decoder layer's output (residual stream) at the last position,
    read from output_hidden_states (hidden_states[i + 1] = layer i's output, except the last,
    which transformers returns after the final norm: that one comes from a hook)."""
    outs = []
    last = model.model.language_model.layers[-1]
    h = last.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0, -1]))
    try:
        with torch.no_grad():
            hidden = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    return torch.stack([x[0, -1] for x in hidden[1:-1]] + outs).float()


def test_vsv_equals_manual_per_sample_computation(llava):
    model, processor = llava
    inputs = _inputs(processor)
    vsv = compute_steering_vectors(model, inputs)
    assert vsv.shape == (4, 2, 64)
    image_token = model.config.image_token_id
    for b in range(2):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()][None]
        pos = _manual_last_layer_outputs(model, ids, inputs["pixel_values"][b : b + 1])
        neg = _manual_last_layer_outputs(model, ids[ids != image_token][None])
        torch.testing.assert_close(vsv[:, b], pos - neg, rtol=1e-4, atol=1e-5)


def test_negative_inputs_drop_every_image_placeholder(llava):
    model, processor = llava
    inputs = _inputs(processor)
    neg = negative_inputs(inputs, model.config.image_token_id, pad_token_id=0)
    lengths = inputs["attention_mask"].sum(1) - (inputs["input_ids"] == model.config.image_token_id).sum(1)
    assert torch.equal(neg["attention_mask"].sum(1), lengths)
    assert not (neg["input_ids"] == model.config.image_token_id).any()


def test_injection_matches_formula_and_moves_toward_v():
    torch.manual_seed(0)
    x, v = torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    lam = 0.4
    v_hat = F.normalize(v, dim=-1)
    gate = 1 + torch.clamp(F.cosine_similarity(x, -v, dim=-1), min=0).unsqueeze(-1)
    expected = x.norm(dim=-1, keepdim=True) * F.normalize(F.normalize(x, dim=-1) + lam * gate * v_hat, dim=-1)
    out = steer(x, v_hat, lam)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # norm preserved
    assert (F.cosine_similarity(out, v, dim=-1) > F.cosine_similarity(x, v, dim=-1)).all()
    assert steer(x.double(), v_hat.double(), lam).dtype == torch.float64


def test_model_mlp_outputs_are_steered_by_the_formula_and_logits_move_along_v(llava):
    model, processor = llava
    inputs = _inputs(processor)
    layers = model.model.language_model.layers
    captured = {}
    hook = lambda name: lambda m, a, o: captured.__setitem__(name, o.detach().clone())  # noqa: E731
    h = layers[0].mlp.register_forward_hook(hook("raw"))
    plain = _logits(model, inputs)
    h.remove()
    lam = 0.8
    handle = apply_vista(model, VISTAConfig(lam=lam, gamma=0.0))
    try:
        vsv = handle.set_steering(inputs)
        h = layers[0].mlp.register_forward_hook(hook("steered"))  # runs after VISTA's hook
        _logits(model, inputs)
        h.remove()
        v = vsv[0][:, None]  # layer 0: its input is not steered, so raw output is comparable
        torch.testing.assert_close(captured["steered"], steer(captured["raw"], F.normalize(v, dim=-1), lam))
        gain = F.cosine_similarity(captured["steered"], v, dim=-1) - F.cosine_similarity(
            captured["raw"], v, dim=-1
        )
        assert (gain[inputs["attention_mask"].bool()] > 0).all()  # padding rows may be exactly 0
        # Steer only the last layer: the logit change lines up with v pushed through norm + lm_head.
        only_last = torch.zeros_like(vsv)
        only_last[-1] = vsv[-1]
        handle.vista.set_vectors(only_last, pinned=True)
        delta = (_logits(model, inputs) - plain)[:, -1]
        norm_w = model.model.language_model.norm.weight
        direction = (F.normalize(vsv[-1], dim=-1) * norm_w) @ model.lm_head.weight.T
        assert (F.cosine_similarity(delta, direction, dim=-1) > 0.5).all()
    finally:
        handle.remove()


# -- SLA -------------------------------------------------------------------------------------
def test_sla_equals_manual_window_mix(llava):
    model, processor = llava
    inputs = _inputs(processor)
    gamma, (first, last) = 0.3, (1, 2)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    # hidden_states[i + 1] is decoder layer i's output (un-normed for i < depth - 1)
    mean = torch.stack(out.hidden_states[first + 1 : last + 2]).mean(0)
    expected = gamma * model.lm_head(mean) + (1 - gamma) * out.logits
    with apply_vista(model, VISTAConfig(lam=0.0, gamma=gamma, layers=(first, last))):
        torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            _logits(model, inputs, logits_to_keep=1), expected[:, -1:], rtol=1e-5, atol=1e-5
        )
        with torch.no_grad():
            gen = model.generate(
                **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        torch.testing.assert_close(gen.logits[0], expected[:, -1], rtol=1e-5, atol=1e-5)


def test_sla_final_norm_equals_manual_normed_window_mix(llava):
    model, processor = llava
    inputs = _inputs(processor)
    gamma, (first, last) = 0.3, (1, 2)
    norm = model.model.language_model.norm
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        window = [model.lm_head(norm(h)) for h in out.hidden_states[first + 1 : last + 2]]
    expected = gamma * torch.stack(window).mean(0) + (1 - gamma) * out.logits
    cfg = VISTAConfig(lam=0.0, gamma=gamma, layers=(first, last), sla_final_norm=True)
    with apply_vista(model, cfg) as handle:
        torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
        assert handle.stats.summary()["sla_mixes"] == 1
    with apply_vista(model, VISTAConfig(lam=0.0, gamma=gamma, layers=(first, last))):
        assert not torch.allclose(_logits(model, inputs), expected, rtol=1e-3, atol=1e-3)


# -- generate ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True, num_return_sequences=2), dict(do_sample=False, num_beams=2)],
    ids=["greedy", "sampling", "beam"],
)
def test_generate_modes_with_a_vector_per_sample(llava, mode):
    model, processor = llava
    inputs = _inputs(processor)
    expected = compute_steering_vectors(model, inputs)
    with apply_vista(model, VISTAConfig(lam=0.5)) as handle, torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=3, **mode)
        rows = 2 * mode.get("num_return_sequences", 1) * mode.get("num_beams", 1)
        auto = handle.steering_vectors  # computed at the prefill, per (expanded) row
        assert auto.shape == (4, rows, 64)
        torch.testing.assert_close(auto, expected.repeat_interleave(rows // 2, dim=1), rtol=1e-4, atol=1e-5)
    assert out.shape[0] == 2 * mode.get("num_return_sequences", 1)


def test_batch_rows_match_single_sample_runs(llava):
    model, processor = llava
    inputs = _inputs(processor)
    with apply_vista(model, VISTAConfig(lam=0.5, gamma=0.3)), torch.no_grad():
        batch = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        for b in range(2):
            single = _inputs(processor, 1, [PROMPTS[b]])
            single["pixel_values"] = inputs["pixel_values"][b : b + 1]
            one = model.generate(
                **single, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            torch.testing.assert_close(batch.logits[0][b], one.logits[0][0], rtol=1e-4, atol=1e-4)


def test_pinned_vectors_repeat_over_rows_and_text_only_needs_them(llava):
    model, processor = llava
    inputs = _inputs(processor)
    text = processor.tokenizer(["USER: What is a cat? ASSISTANT:"], return_tensors="pt")
    with apply_vista(model, VISTAConfig(lam=0.5)) as handle, torch.no_grad():
        with pytest.raises(RuntimeError, match="steering vector"):
            model(**text)
        handle.set_steering({k: v[:1] for k, v in inputs.items()})
        model.generate(
            **text, max_new_tokens=2, num_beams=3, do_sample=False
        )  # 3 rows share sample 0's vector
        assert handle.steering_vectors.shape[1] == 1
        handle.clear_steering()
        with pytest.raises(RuntimeError, match="steering vector"):
            model(**text)


# -- composition -------------------------------------------------------------------------------
@pytest.mark.parametrize("vista_first", [True, False])
def test_composes_with_hired_on_llava_next(llava_next, vista_first):
    model, processor = llava_next
    processor.tokenizer.padding_side = "left"
    images = [tiny_image(64, 128, seed=0), tiny_image(128, 128, seed=1)]
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**inputs).logits
    hired_cfg, vista_cfg = HiREDConfig(), VISTAConfig(lam=0.5, gamma=0.3)
    if vista_first:
        vista = apply_vista(model, vista_cfg)
        hired = apply_hired(model, hired_cfg)
    else:
        hired = apply_hired(model, hired_cfg)
        vista = apply_vista(model, vista_cfg)
    with torch.no_grad():
        expected = compute_steering_vectors(model, inputs)  # through HiRED's pruned prompt
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    # generate numbers the pruned prompt's positions 0..n-1, HiRED's forward keeps the original
    # positions (with gaps) for compute_steering_vectors: same vectors up to that small shift.
    torch.testing.assert_close(vista.steering_vectors, expected, rtol=0.05, atol=1e-3)
    kept = sum(s.tokens_after for s in hired.last_selections)
    assert kept < int((inputs["input_ids"] == model.config.image_token_id).sum())
    for handle in (hired, vista) if vista_first else (vista, hired):  # newest first
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_works_under_the_vlm_api(llava):
    from mmaccel.vlm.api import load_vlm

    model, processor = llava
    vlm = load_vlm(model, processor=processor)
    images = [tiny_image(seed=0), tiny_image(seed=1)]
    with apply_vista(vlm.model, VISTAConfig()) as handle:
        out = vlm.generate(images, ["What is shown?", "Describe the picture."], max_new_tokens=2)
        assert handle.steering_vectors.shape == (4, 2, 64)  # one vector per sample, set at the prefill
    assert len(out.texts) == 2


def test_text_only_llama_with_explicit_pairs():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    pos, neg = {"input_ids": torch.tensor([[1, 5, 6, 7]])}, {"input_ids": torch.tensor([[1, 7]])}
    with pytest.raises(ValueError, match="negative"):
        compute_steering_vectors(model, pos)
    with apply_vista(model, VISTAConfig(lam=0.3, gamma=0.2)) as handle, torch.no_grad():
        vectors = handle.set_steering(pos, neg)
        assert vectors.shape == (3, 1, 32) and handle.window == (1, 1)
        out = model.generate(input_ids=torch.tensor([[1, 9, 9]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_lm_head_slice_of_older_transformers_equals_the_named_rule():
    """SLA slices the early-exit states as the language model slices lm_head's input; before 5.21
    the rule was inline in each model (vista carries it), from 5.21 transformers names it."""
    from transformers import modeling_utils

    from mmaccel.vlm.vista import _slice_before_lm_head

    named = getattr(modeling_utils, "slice_logits_to_keep", None)
    if named is None:
        pytest.skip("this transformers has no slice_logits_to_keep to compare with")
    h = torch.randn(2, 7, 5)
    for keep in (0, 1, 3, torch.tensor([0, 4, 6])):
        assert torch.equal(_slice_before_lm_head(h, keep), named(h, keep))
