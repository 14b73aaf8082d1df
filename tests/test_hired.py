"""HiRED: selection arithmetic, [CLS]-row scoring vs eager attention, patching LLaVA / LLaVA-NeXT."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmaccel.runtime.budget import TokenBudget, allocate
from mmaccel.testing import TINY_CALL_KWARGS, tiny_image, tiny_llava, tiny_llava_next
from mmaccel.testing.hotpath import count_hot_path
from mmaccel.vlm.cls_attention import ClsAttentionRecorder
from mmaccel.vlm.hired import NEWLINE, HiREDConfig, apply_hired, select_visual_tokens
from mmaccel.vlm.hired_select import BatchLayout, ImageLayout, allocate_rows, crop_regions_of, select_batch
from mmaccel.vlm.placeholders import shrink_placeholders

PROMPT = TINY_CALL_KWARGS["llava"]["text"]
PROMPT2 = "USER: <image>\nWhat color is the big disc on the left? ASSISTANT:"


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


def _inputs(processor, images, prompts):
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _eager_cls_rows(tower, pixel_values, layers):
    """Reference: full eager attention matrices, row 0, heads summed."""
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(pixel_values, output_attentions=True)
    return {i: out.attentions[i][:, :, 0, :].sum(1) for i in layers}


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err, word",
    [
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha="half"), TypeError, "alpha"),
        (dict(budget=0.2), TypeError, "budget"),
        (dict(content_layer=1.5), TypeError, "content_layer"),
        (dict(select_layer="last"), TypeError, "select_layer"),
        (dict(keep_newlines=1), TypeError, "keep_newlines"),
        (dict(crop_regions="grid"), ValueError, "crop_regions"),
    ],
)
def test_config_rejects_bad_values(kwargs, err, word):
    with pytest.raises(err, match=word):
        HiREDConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, word", [(dict(ratio=0.0), "ratio"), (dict(ratio=1.01), "ratio"), (dict(count=0), "count")]
)
def test_budget_outside_range_is_rejected(kwargs, word):
    with pytest.raises(ValueError, match=word):
        HiREDConfig(budget=TokenBudget(**kwargs))


def test_layer_out_of_range_names_the_parameter(llava):
    model, _ = llava
    with pytest.raises(ValueError, match="select_layer"):
        apply_hired(model, HiREDConfig(select_layer=4))
    with pytest.raises(ValueError, match="content_layer"):
        apply_hired(model, HiREDConfig(content_layer=-5))
    assert "_mmaccel_patches" not in model.__dict__  # nothing was installed


def test_unsupported_models_raise_type_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=32))  # fmt: skip
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        apply_hired(lm, HiREDConfig())


def test_transformers_without_mm_encoder_outputs_is_refused_before_patching(llava_next, monkeypatch):
    """transformers 5.17 (the GPU machine's) has no ``forward(mm_encoder_outputs=...)``: one clear
    line instead of generate's 'model_kwargs are not used' after the image was encoded."""
    import transformers

    def old_forward(input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs):
        raise AssertionError("never called")

    model = llava_next.model
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    monkeypatch.setattr(model, "forward", old_forward)
    with pytest.raises(ImportError, match=r"transformers >= 5\.18.*transformers 5\.17\.0"):
        apply_hired(model, HiREDConfig())
    assert model.forward is old_forward and not hasattr(model, "_mmaccel_hired")


def test_tower_without_cls_raises_clearly():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)  # fmt: skip
    text = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=40
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=39)
    )
    with pytest.raises(NotImplementedError, match=r"\[CLS\]"):
        apply_hired(model, HiREDConfig())


# ---------------------------------------------------------------------------------------------
# Selection arithmetic (pure)
# ---------------------------------------------------------------------------------------------


def _grid_layout(base: int, crop_rows: int, crop_cols: int, crops_w: int, crops_h: int):
    """Partition ids of a LLaVA-NeXT packed layout: base, then the crop grid row by row + newline."""
    parts = [0] * base
    for r in range(crops_h * crop_rows):
        for c in range(crops_w * crop_cols):
            parts.append(1 + (r // crop_rows) * crops_w + c // crop_cols)
        parts.append(NEWLINE)
    return torch.tensor(parts)


def test_selection_uses_the_budget_exactly_and_follows_the_allocation():
    gen = torch.Generator().manual_seed(0)
    part = _grid_layout(base=16, crop_rows=4, crop_cols=4, crops_w=2, crops_h=2)  # 16 + 4 x 16 tokens
    content = torch.rand(part.numel(), generator=gen)
    select = torch.rand(part.numel(), generator=gen)
    content[part == 3] *= 5  # crop 3 has most content
    for ratio in (0.05, 0.2, 0.37, 0.6, 1.0):
        budget = TokenBudget(ratio=ratio)
        sel = select_visual_tokens(part, content, select, budget, alpha=0.5)
        total = budget.resolve(80)
        assert sel.budget == total
        assert sum(sel.kept_per_partition) == total
        assert int(sel.keep[part != NEWLINE].sum()) == total
        base = min(math.floor(0.5 * total), 16)
        assert sel.kept_per_partition[0] == base
        # the reference's content score: the base image's top int(16 * (1 - alpha)) early-layer
        # tokens counted per contiguous strip of 16 / 4 tokens
        top = content[part == 0].topk(8).indices
        mass = torch.bincount(top // 4, minlength=4).double()
        expected = allocate(total - base, mass, torch.full((4,), 16))
        assert list(sel.kept_per_partition[1:]) == expected.tolist()
        for p in range(5):  # the kept tokens are the top ones of their partition
            scores = select[part == p]
            kept = sel.keep[part == p]
            if 0 < kept.sum() < kept.numel():
                assert scores[kept].min() > scores[~kept].max()


def _reference_crop_budgets(base_early, crops, n, rate, alpha):
    """Independent transcription of the reference's rule (HiRED_token_selection +
    HiRED_sub_img_budgets in its modeling_llava_next.py), every partition holding ``n`` tokens."""
    parts = crops + 1
    total = int(parts * n * rate)
    full = min(int(total * alpha), n)
    sub = min(total - full, crops * n)
    spatial = torch.zeros(n, dtype=torch.bool)
    spatial[base_early.topk(int(n * (1 - alpha))).indices] = True
    counts = spatial.reshape(crops, -1).sum(-1)  # the reference reshapes to (rows, cols, -1)
    share = counts / counts.sum()
    return total, full, sub, torch.clamp((share * sub).int(), max=n)


def test_crop_budgets_follow_the_reference_rule_on_random_maps():
    gen = torch.Generator().manual_seed(1)
    n = 64
    for trial in range(40):
        crops = (2, 4)[trial % 2]
        rate = (0.1, 0.25, 0.5)[trial % 3]
        alpha = (0.5, 0.3)[trial % 2]
        early = torch.rand(n * (crops + 1), generator=gen) ** 4
        select = torch.rand(n * (crops + 1), generator=gen)
        part = torch.arange(crops + 1).repeat_interleave(n)
        total, full, sub, ref = _reference_crop_budgets(early[:n], crops, n, rate, alpha)
        sel = select_visual_tokens(part, early, select, TokenBudget(count=total), alpha=alpha)
        assert sel.kept_per_partition[0] == full
        ours = torch.tensor(sel.kept_per_partition[1:])
        # the one deliberate difference: the reference floors each share, we hand out the rest
        assert set((ours - ref).tolist()) <= {0, 1}
        assert int(ours.sum()) == sub


def test_content_in_one_crop_gets_most_of_the_crop_budget():
    # base image 8 x 8; all of its early-layer attention mass sits in one crop's region
    n, g = 64, 8
    gen = torch.Generator().manual_seed(2)
    for regions, hot_cells, hot_crop in (
        ("strips", range(32, 48), 3),  # strip 2 of 4 (raster rows 4-5) -> crop 3
        ("tiles", [r * g + c for r in range(4, 8) for c in range(4)], 3),  # bottom-left quadrant
    ):
        early = torch.rand(5 * n, generator=gen) * 0.01
        early[torch.tensor(list(hot_cells))] += 1.0
        part = torch.arange(5).repeat_interleave(n)
        for alpha in (0.5, 0.75):  # the reference counts the top int(64 * (1 - alpha)) tokens
            sel = select_visual_tokens(
                part, early, torch.rand(5 * n, generator=gen), TokenBudget(ratio=0.3), alpha=alpha,
                crop_regions=regions, grid=(2, 2),
            )  # fmt: skip
            crops = sorted(sel.kept_per_partition[1:])
            hot = sel.kept_per_partition[hot_crop]
            assert hot == crops[-1] and hot >= 1.5 * crops[-2]
            if alpha == 0.75:  # 16 counted tokens, all in the hot region
                assert hot == sum(crops)
    # the same hot quadrant read as strips spreads over two crops, as the reference does
    sel = select_visual_tokens(part, early, torch.rand(5 * n), TokenBudget(ratio=0.2), alpha=0.5)
    assert sorted(sel.kept_per_partition[1:])[-2] > 0


def test_full_crops_hand_the_rest_to_the_base():
    part = torch.tensor([0] * 10 + [1, 1, NEWLINE])
    sel = select_visual_tokens(part, torch.ones(13), torch.arange(13.0), TokenBudget(count=8), alpha=0.0)
    assert sel.kept_per_partition == (6, 2)
    assert sel.budget == 8


def test_newlines_follow_their_rows():
    part = _grid_layout(base=4, crop_rows=2, crop_cols=2, crops_w=1, crops_h=1)  # base, [1 1 nl 1 1 nl]
    select = torch.tensor([0.0, 0, 0, 0, 9, 8, 0, 1, 2, 0])  # crop row 0 wins
    sel = select_visual_tokens(part, torch.ones(10), select, TokenBudget(count=4), alpha=0.5)
    # base keeps 2 (ties: first ones), the crop its 2 best, both in row 0 -> only row 0's newline
    assert sel.keep.tolist() == [True, True, False, False, True, True, True, False, False, False]
    sel = select_visual_tokens(part, torch.ones(10), select, TokenBudget(count=4), keep_newlines=False)
    assert not sel.keep[part == NEWLINE].any()
    assert sel.tokens_after == 4


# ---------------------------------------------------------------------------------------------
# [CLS]-row scoring vs eager attention
# ---------------------------------------------------------------------------------------------


def test_cls_row_matches_eager_attention(llava):
    model, _ = llava
    tower = model.model.vision_tower
    assert tower.config._attn_implementation == "sdpa"
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    recorder = ClsAttentionRecorder([layer.self_attn for layer in tower.encoder.layers], [0, 2])
    hooks = recorder.install()
    try:
        recorder.active = True
        with torch.no_grad():
            tower(pixel_values)
    finally:
        for h in hooks:
            h.remove()
    reference = _eager_cls_rows(tower, pixel_values, [0, 2])
    for layer in (0, 2):
        torch.testing.assert_close(recorder.scores[layer], reference[layer], atol=1e-6, rtol=1e-5)


def test_llava_keeps_the_true_top_k(llava):
    model, processor = llava
    images = [tiny_image(seed=0), tiny_image(seed=5)]
    inputs = _inputs(processor, images, [PROMPT, PROMPT2])
    with apply_hired(model, HiREDConfig(budget=TokenBudget(count=10))) as handle:
        assert handle.hired.select_layer == 2  # vision_feature_layer=-2 of a 4-layer tower
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        selections = handle.last_selections
    reference = _eager_cls_rows(model.model.vision_tower, inputs["pixel_values"], [2])[2][:, 1:]
    for sel, ref in zip(selections, reference):
        assert sel.kept_per_partition == (10,)
        assert set(sel.keep.nonzero().squeeze(1).tolist()) == set(ref.topk(10).indices.tolist())


def test_llava_next_allocation_and_top_k_vs_eager(llava_next):
    """128 x 128 input = base + 2 x 2 crops of 8 x 8 without unpadding: check against eager."""
    model, processor = llava_next
    inputs = _inputs(processor, [tiny_image(128, 128, seed=2)], [PROMPT])
    budget = TokenBudget(ratio=0.3)
    with apply_hired(model, HiREDConfig(budget=budget)) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        (sel,) = handle.last_selections
    pixel = inputs["pixel_values"][0]
    ref = _eager_cls_rows(model.model.vision_tower, pixel, [0, 2])
    content, select = ref[0][:, 1:], ref[2][:, 1:]  # (5 partitions, 64)
    total = budget.resolve(5 * 64)
    assert sel.budget == total and sum(sel.kept_per_partition) == total
    base = math.floor(0.5 * total)
    mass = torch.bincount(content[0].topk(32).indices // 16, minlength=4).double()  # reference rule
    expected = allocate(total - base, mass, torch.full((4,), 64))
    assert sel.kept_per_partition == (base, *expected.tolist())
    # Rebuild which packed positions belong to which crop / local patch, independently.
    keep = sel.keep
    assert set(keep[:64].nonzero().squeeze(1).tolist()) == set(select[0].topk(base).indices.tolist())
    kept_local = {p: set() for p in range(1, 5)}
    for r in range(16):
        row = keep[64 + r * 17 : 64 + (r + 1) * 17]
        for c in range(16):
            if row[c]:
                kept_local[1 + (r // 8) * 2 + c // 8].add((r % 8) * 8 + c % 8)
        assert bool(row[16]) == bool(row[:16].any())  # newline iff the row keeps a token
    for p in range(1, 5):
        assert kept_local[p] == set(select[p].topk(int(expected[p - 1])).indices.tolist())


# ---------------------------------------------------------------------------------------------
# Patched models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_full_budget_reproduces_the_dense_model(which, llava, llava_next):
    model, processor = llava if which == "llava" else llava_next
    size = (64, 64) if which == "llava" else (64, 128)
    inputs = _inputs(processor, [tiny_image(*size, seed=0), tiny_image(128, 128, seed=1)], [PROMPT, PROMPT2])
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    dense = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=1.0))):
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, dense)


def test_batch_with_different_partition_counts_equals_single_runs(llava_next):
    model, processor = llava_next
    images = [tiny_image(64, 128, seed=3), tiny_image(128, 128, seed=4)]  # 3 and 5 partitions
    prompts = [PROMPT, PROMPT2]
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.25))) as handle:
        batch = model.generate(**_inputs(processor, images, prompts), **kw)
        assert [s.partitions for s in handle.last_selections] == [3, 5]
        singles = [model.generate(**_inputs(processor, [i], [p]), **kw) for i, p in zip(images, prompts)]
    for b, single in enumerate(singles):
        n = single.sequences.shape[1]
        assert torch.equal(batch.sequences[b, -5:], single.sequences[0, -5:])
        assert torch.equal(batch.sequences[b, -n:], single.sequences[0])  # the caller's prompt comes back
        for step in range(5):
            torch.testing.assert_close(batch.scores[step][b], single.scores[step][0], atol=1e-4, rtol=1e-4)


def test_forward_shrinks_the_sequence_and_respects_position_ids(llava_next):
    model, processor = llava_next
    inputs = _inputs(processor, [tiny_image(64, 128, seed=3)], [PROMPT])
    t = inputs["input_ids"].shape[1]
    with apply_hired(model, HiREDConfig(budget=TokenBudget(count=20))) as handle:
        with torch.no_grad():
            out = model(**inputs)
        (sel,) = handle.last_selections
        assert out.logits.shape[1] == t - (sel.tokens_before - sel.tokens_after)
        with torch.no_grad():  # explicit positions are shrunk with the tokens: kept tokens keep theirs
            gapped = model(**inputs, position_ids=torch.arange(t)[None]).logits
    assert gapped.shape == out.logits.shape
    assert not torch.allclose(gapped, out.logits)  # gapped original positions differ from contiguous ones


def test_remove_restores_bit_for_bit(llava_next):
    model, processor = llava_next
    inputs = _inputs(processor, [tiny_image(64, 128, seed=0)], [PROMPT])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {name: dict(m.__dict__) for name, m in model.named_modules()}
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    with torch.no_grad():
        before = model(**inputs).logits
    handle = apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.2)))
    with pytest.raises(ValueError, match="already applied"):
        apply_hired(model, HiREDConfig())
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    handle.remove()
    for name, m in model.named_modules():
        assert m.__dict__.keys() == dicts[name].keys(), name
        assert (dict(m._forward_hooks), dict(m._forward_pre_hooks)) == hooks[name], name
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ---------------------------------------------------------------------------------------------
# Placeholder shrinking
# ---------------------------------------------------------------------------------------------


def test_shrink_placeholders_left_and_right_padding():
    img, pad = 9, 0
    ids = torch.tensor([[pad, 5, img, img, img, 6], [5, img, img, img, 7, 8]])
    mask = (ids != pad).long()
    keep = torch.tensor([True, False, True, False, False, True])
    out = shrink_placeholders(ids, keep, img, pad_token_id=pad, attention_mask=mask,
                              position_ids=torch.arange(6).expand(2, 6), labels=ids.clone())  # fmt: skip
    assert out["input_ids"].tolist() == [[pad, 5, img, img, 6], [pad, 5, img, 7, 8]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 4, 5], [0, 0, 3, 4, 5]]
    assert out["labels"].tolist() == [[pad, 5, img, img, 6], [-100, 5, img, 7, 8]]
    right = shrink_placeholders(ids[1:], keep[3:], img, pad_token_id=pad, padding_side="right")
    assert right["input_ids"].tolist() == [[5, img, 7, 8]]
    with pytest.raises(ValueError, match="one entry per <image>"):
        shrink_placeholders(ids, keep[:4], img, pad_token_id=pad)


def test_get_image_features_returns_the_pruned_features(llava_next):
    model, processor = llava_next
    inputs = _inputs(
        processor, [tiny_image(64, 128, seed=1), tiny_image(128, 128, seed=2)], [PROMPT, PROMPT2]
    )
    with torch.no_grad():
        dense = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.3))) as handle:
            pruned = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
            selections = handle.last_selections
    for d, p, sel in zip(dense, pruned, selections):
        assert p.shape[0] == sel.tokens_after
        torch.testing.assert_close(p, d[sel.keep])


# ---------------------------------------------------------------------------------------------
# The batched device selection (vlm/hired_select.py) against the per-image rule
# ---------------------------------------------------------------------------------------------


def test_allocate_rows_equals_allocate_row_by_row():
    gen = torch.Generator().manual_seed(3)
    for trial in range(300):
        b, c = 1 + trial % 4, 1 + trial % 6
        weights = torch.randint(0, 6, (b, c), generator=gen).double()
        weights[torch.rand(b, c, generator=gen) < 0.2] = 0.0  # zero-weight groups
        capacity = torch.randint(0, 12, (b, c), generator=gen)
        capacity[:, c - 1 - trial % c :] *= trial % 3 > 0  # padded (empty) groups at the end
        remaining = torch.randint(0, 60, (b,), generator=gen)
        got = allocate_rows(remaining, weights, capacity)
        for row in range(b):
            expected = allocate(int(remaining[row]), weights[row], capacity[row])
            assert got[row].tolist() == expected.tolist(), (trial, row)


def _image_layout(part: list[int], n_base: int, crops: int, regions: str = "strips", grid=None):
    part_t = torch.tensor(part)
    source = torch.zeros_like(part_t)
    for p in range(crops + 1):  # tokens of partition p in raster order -> index p * n + j
        idx = (part_t == p).nonzero().squeeze(1)
        source[idx] = p * n_base + torch.arange(idx.numel())
    region = crop_regions_of(n_base, crops, regions, grid) if crops else torch.zeros(n_base, dtype=torch.long)
    return ImageLayout.of(part_t, source, region)


def _layouts(n_images: int):
    """Packed LLaVA-NeXT-like layouts of 16-token partitions: 1, 3 (1 x 2 crops) or 5 (2 x 2) partitions,
    crops un-padded to fewer rows as LLaVA-NeXT does for wide images."""
    cases = []
    for i in range(n_images):
        kind = i % 4
        if kind == 0:  # single partition + trailing newline
            cases.append(([0] * 16 + [NEWLINE], 0, None))
        elif kind == 1:  # 1 x 2 crops of 4 x 4, unpadded to 3 rows
            part = [0] * 16
            for _ in range(3):
                part += [1] * 4 + [2] * 4 + [NEWLINE]
            cases.append((part, 2, (1, 2)))
        else:  # 2 x 2 crops
            cases.append((_grid_layout(16, 4, 4, 2, 2).tolist(), 4, (2, 2)))
    return cases


@pytest.mark.parametrize("regions", ["strips", "tiles"])
@pytest.mark.parametrize("keep_newlines", [True, False])
def test_batched_selection_equals_the_per_image_rule(regions, keep_newlines):
    gen = torch.Generator().manual_seed(4)
    cases = _layouts(6)
    n = 16
    for trial in range(12):
        ratio = (0.05, 0.1, 0.2, 0.37, 0.5, 1.0)[trial % 6]
        alpha = (0.5, 0.3, 1.0, 0.0)[trial % 4]
        budget = TokenBudget(ratio=ratio) if trial % 5 else TokenBudget(count=7)
        images = [_image_layout(part, n, crops, regions, grid) for part, crops, grid in cases]
        passes = sum(len(im.sizes) for im in images)
        # quantised scores: many exact ties, as the grey background of the zoo scenes gives
        content = (torch.rand(passes, n, generator=gen) * 4).floor() / 4
        select = (torch.rand(passes, n, generator=gen) * 3).floor() / 3
        layout = BatchLayout.build(images, n, budget, alpha)
        keep, kept = select_batch(layout, content, select, alpha, keep_newlines)
        row = 0
        for b, (im, (_, _, grid)) in enumerate(zip(images, cases)):
            flat_c = content[row : row + len(im.sizes)].reshape(-1)
            flat_s = select[row : row + len(im.sizes)].reshape(-1)
            row += len(im.sizes)
            c, s = flat_c[im.source], flat_s[im.source]
            ref = select_visual_tokens(im.partition, c, s, budget, alpha, keep_newlines, regions, grid)
            length = layout.lengths[b]
            assert torch.equal(keep[b, :length], ref.keep), (trial, b)
            assert not keep[b, length:].any()
            assert tuple(kept[b, : len(im.sizes)].tolist()) == ref.kept_per_partition


def test_batched_selection_has_no_host_sync():
    n = 16
    images = [_image_layout(part, n, crops, "strips", grid) for part, crops, grid in _layouts(5)]
    layout = BatchLayout.build(images, n, TokenBudget(ratio=0.3), 0.5)
    passes = sum(len(im.sizes) for im in images)
    content, select = torch.rand(passes, n), torch.rand(passes, n)
    features = torch.randn(len(images), max(layout.lengths), 8)
    for feats in (None, features):
        select_batch(layout, content, select, 0.5, True, feats)  # warm-up
        count = count_hot_path(lambda f=feats: select_batch(layout, content, select, 0.5, True, f))
        assert count.syncs == 0, count.sync_counts
        assert count.ops > 0


def _recorded_reference(model, inputs, config):
    """The per-image rule on scores recorded by an independent ClsAttentionRecorder (same q/k)."""
    from mmaccel.runtime.adapters import llava as adapter

    patch_free = adapter.vision_attention_layers(model, "test")
    n_layers = len(patch_free)
    select_layer = adapter.feature_layer_index(model, n_layers, "select") if config.select_layer is None else config.select_layer
    recorder = ClsAttentionRecorder([layer.self_attn for layer in patch_free], [config.content_layer, select_layer])
    hooks = recorder.install()
    recorder.active = True
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    finally:
        for h in hooks:
            h.remove()
    content = recorder.scores[config.content_layer][:, 1:]
    select = recorder.scores[select_layer][:, 1:]
    counts = adapter.partitions_per_image(model, inputs["image_sizes"])
    metas = []
    for c, s in zip(content.split(counts), select.split(counts)):
        part = torch.arange(c.shape[0], dtype=c.dtype)[:, None].expand_as(c)
        metas.append(torch.stack([part, c, s], -1).double())
    marker = torch.tensor([NEWLINE, 0.0, 0.0], dtype=torch.float64)
    packed, _ = model.model.pack_image_features(metas, inputs["image_sizes"], vision_feature_select_strategy="default",
                                                image_newline=marker)  # fmt: skip
    grids = [adapter.anyres_grid(model, s) for s in inputs["image_sizes"]]
    return [
        select_visual_tokens(m[:, 0].round().long(), m[:, 1], m[:, 2], config.budget, config.alpha,
                             config.keep_newlines, config.crop_regions, g)  # fmt: skip
        for m, g in zip(packed, grids)
    ]


def _assert_same_selections(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert torch.equal(g.keep, r.keep)
        assert g.kept_per_partition == r.kept_per_partition
        assert g.tokens_per_partition == r.tokens_per_partition and g.budget == r.budget


def test_patched_tiny_llava_next_selects_as_the_per_image_rule(llava_next):
    model, processor = llava_next
    images = [tiny_image(64, 128, seed=3), tiny_image(128, 128, seed=4), tiny_image(128, 64, seed=5),
              tiny_image(64, 64, seed=6)]  # fmt: skip
    inputs = _inputs(processor, images, [PROMPT, PROMPT2, PROMPT, PROMPT2])
    for config in (HiREDConfig(budget=TokenBudget(ratio=0.25)), HiREDConfig(budget=TokenBudget(ratio=0.1), alpha=0.3),
                   HiREDConfig(budget=TokenBudget(count=30), crop_regions="tiles", keep_newlines=False)):  # fmt: skip
        with apply_hired(model, config) as handle:
            with torch.no_grad():
                model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            got = handle.last_selections
        _assert_same_selections(got, _recorded_reference(model, inputs, config))


@pytest.mark.slow
def test_patched_zoo_vlm_selects_as_the_per_image_rule():
    """Every budget the benchmark uses, on 48 held-out scenes of the zoo VLM (all four sizes)."""
    from mmaccel.apps.zoo.shapes_vlm import eval_set, load

    model, processor = load()
    qa, _ = eval_set(48, 0)
    for start in range(0, 48, 16):
        chunk = qa[start : start + 16]
        inputs = _inputs(processor, [it.scene.image for it in chunk], [PROMPT] * len(chunk))
        for ratio in (0.1, 0.2, 0.5):
            for regions in ("strips", "tiles"):
                config = HiREDConfig(budget=TokenBudget(ratio=ratio), crop_regions=regions)
                with apply_hired(model, config) as handle:
                    with torch.no_grad():
                        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
                    got = handle.last_selections
                _assert_same_selections(got, _recorded_reference(model, inputs, config))


@pytest.mark.parametrize("keep_newlines", [True, False])
def test_hired_adds_at_most_one_sync_to_the_image_encode(llava_next, keep_newlines):
    """Steady state (layouts cached): HiRED's scoring and selection read nothing on the host; the
    one read left is the kept count per image when kept newlines make it data-dependent."""
    model, processor = llava_next
    inputs = _inputs(processor, [tiny_image(64, 128, seed=3), tiny_image(128, 128, seed=4)], [PROMPT, PROMPT2])
    pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
    dense = count_hot_path(lambda: model.model.get_image_features(pv, sizes))
    for selection in ("cls", "diverse"):
        config = HiREDConfig(budget=TokenBudget(ratio=0.3), keep_newlines=keep_newlines, selection=selection)
        with apply_hired(model, config):
            model.model.get_image_features(pv, sizes)  # warm-up: builds the cached layouts
            hired = count_hot_path(lambda: model.model.get_image_features(pv, sizes))
        added = hired.sync_counts - dense.sync_counts
        # image_sizes.tolist() (a CPU tensor here; LLaVA-NeXT's own encode reads it too) and,
        # with newlines, keep.sum(1).tolist()
        assert added == ({"tolist": 2} if keep_newlines else {"tolist": 1}), (selection, added, dense.sync_counts)


# ---------------------------------------------------------------------------------------------
# selection="diverse" (DivPrune's max-min diversity inside HiRED's budgets)
# ---------------------------------------------------------------------------------------------


def _divprune(features: torch.Tensor, k: int) -> set[int]:
    """DivPrune's greedy rule as its code writes it (one partition): cosine distance matrix, the first
    pick maximises the distance to the nearest other token, then each pick the minimum distance to
    the picked set."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.T
    picked: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist[picked].min(0).values
            scores[picked] = -math.inf
        picked.append(int(scores.argmax()))
    return set(picked)


def test_diverse_selection_is_divprune_inside_each_partition():
    gen = torch.Generator().manual_seed(5)
    n = 16
    cases = _layouts(4)
    images = [_image_layout(part, n, crops) for part, crops, _ in cases]
    budget = TokenBudget(ratio=0.3)
    layout = BatchLayout.build(images, n, budget, 0.5)
    passes = sum(len(im.sizes) for im in images)
    content, select = torch.rand(passes, n, generator=gen), torch.rand(passes, n, generator=gen)
    features = torch.randn(len(images), max(layout.lengths), 12, generator=gen)
    keep, kept = select_batch(layout, content, select, 0.5, False, features)
    cls_keep, cls_kept = select_batch(layout, content, select, 0.5, False)
    assert torch.equal(kept, cls_kept)  # the budgets are HiRED's; only the choice inside differs
    assert not torch.equal(keep, cls_keep)
    for b, im in enumerate(images):
        for p in range(len(im.sizes)):
            idx = (layout.partition[b] == p).nonzero().squeeze(1)
            chosen = set(keep[b, idx].nonzero().squeeze(1).tolist())
            assert chosen == _divprune(features[b, idx], int(kept[b, p])), (b, p)


def test_diverse_selection_covers_every_cluster():
    """Four tight clusters of features in one partition, budget 4: one token from each."""
    gen = torch.Generator().manual_seed(6)
    centres = torch.eye(4, 8) * 5
    which = torch.arange(16) % 4
    features = (centres[which] + 0.01 * torch.randn(16, 8, generator=gen))[None]
    image = _image_layout([0] * 16, 16, 0)
    layout = BatchLayout.build([image], 16, TokenBudget(count=4), 0.5)
    keep, _ = select_batch(layout, torch.rand(1, 16), torch.rand(1, 16), 0.5, False, features)
    assert sorted(which[keep[0]].tolist()) == [0, 1, 2, 3]


def test_diverse_option_runs_on_an_sdpa_tower_and_keeps_the_budget(llava_next):
    model, processor = llava_next
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    inputs = _inputs(processor, [tiny_image(64, 128, seed=3), tiny_image(128, 128, seed=4)], [PROMPT, PROMPT2])
    config = HiREDConfig(budget=TokenBudget(ratio=0.25), selection="diverse")
    with apply_hired(model, config) as handle:
        assert handle.hired.recorder.layers == [handle.hired.content_layer]  # no select-layer scores needed
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        diverse = handle.last_selections
    with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.25))) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        cls = handle.last_selections
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    for d, c in zip(diverse, cls):
        assert d.kept_per_partition == c.kept_per_partition  # same crop budgets
        assert d.tokens_after >= d.budget == sum(d.kept_per_partition)  # + the kept rows' newlines
        assert not torch.equal(d.keep, c.keep)


def test_selection_name_is_validated():
    with pytest.raises(ValueError, match="selection"):
        HiREDConfig(selection="random")


def test_patched_forward_adds_only_the_length_reads(llava_next):
    """The whole patched forward (encode, select, shrink the prompt, LM) against the dense one: no
    boolean indexing or nonzero; the added host reads are the layout key (image_sizes), the kept
    counts, the placeholder count, the padding side and the new length."""
    model, processor = llava_next
    inputs = _inputs(processor, [tiny_image(64, 128, seed=3), tiny_image(128, 128, seed=4)], [PROMPT, PROMPT2])
    dense = count_hot_path(lambda: model(**inputs))
    with apply_hired(model, HiREDConfig(budget=TokenBudget(ratio=0.2))):
        model(**inputs)
        hired = count_hot_path(lambda: model(**inputs))
    added = hired.sync_counts - dense.sync_counts
    assert added == {"tolist": 2, "item": 3}, (added, hired.sync_counts, dense.sync_counts)
