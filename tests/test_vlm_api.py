"""The VLM Python API: loading, batched generate with stats, input handling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmaccel.runtime.budget import TokenBudget
from mmaccel.testing import save_tiny, tiny_image, tiny_llava
from mmaccel.vlm import VLM, HiREDConfig, load_image, load_vlm


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    return save_tiny("llava_next", tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="module")
def dense(next_folder):
    return load_vlm(next_folder)


def test_load_from_folder_and_generate_with_stats(next_folder, dense):
    images = [tiny_image(64, 128, seed=1), tiny_image(128, 128, seed=2)]
    prompts = ["What is shown in the image?", "Describe the picture."]
    full = dense.generate(images, prompts, max_new_tokens=4)
    vlm = load_vlm(next_folder, hired=HiREDConfig(budget=TokenBudget(ratio=0.2)))
    pruned = vlm.generate(images, prompts, max_new_tokens=4)
    assert len(full.texts) == len(pruned.texts) == 2
    assert [s.partitions for s in full.stats] == [s.partitions for s in pruned.stats] == [3, 5]
    for f, p, sel in zip(full.stats, pruned.stats, vlm.handle.last_selections):
        assert f.visual_tokens_before == f.visual_tokens_after == p.visual_tokens_before == sel.tokens_before
        assert p.visual_tokens_after == sel.tokens_after < p.visual_tokens_before
        assert sel.budget == TokenBudget(ratio=0.2).resolve(sum(sel.tokens_per_partition))
        assert 1 <= p.new_tokens <= 4
        assert p.time_to_first_token_s > 0 and p.decode_tokens_per_s > 0 and p.peak_memory_bytes > 0


def test_dense_api_matches_raw_generate(dense):
    image, prompt = tiny_image(64, 128, seed=3), "What is shown in the image?"
    out = dense.generate(image, prompt, max_new_tokens=5)
    text = dense.format_prompt(prompt)
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")  # the model's chat template
    inputs = dense.processor(images=[image], text=[text], return_tensors="pt")
    raw = dense.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = dense.processor.batch_decode(raw[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.texts == [expected[0].strip()]


def test_full_budget_api_equals_dense(next_folder, dense):
    images = [tiny_image(128, 64, seed=4), tiny_image(64, 64, seed=5)]
    prompts = ["How many cats are there?", "What color is the sky?"]
    vlm = load_vlm(next_folder, hired=HiREDConfig(budget=TokenBudget(ratio=1.0)))
    assert vlm.generate(images, prompts, max_new_tokens=4).texts == dense.generate(images, prompts, 4).texts


def test_image_inputs_paths_arrays_pil_agree(tmp_path, dense):
    image = tiny_image(64, 128, seed=6)
    path = tmp_path / "img.png"
    image.save(path)
    as_float = np.asarray(image).astype(np.float32) / 255.0
    outs = [
        dense.generate(x, "What is shown?", max_new_tokens=3).texts
        for x in (image, path, str(path), np.asarray(image), as_float)
    ]
    assert all(o == outs[0] for o in outs)


def test_llava_15_through_the_api():
    model, processor = tiny_llava()
    vlm = load_vlm(model, processor=processor, hired=HiREDConfig(budget=TokenBudget(count=16)))
    out = vlm.generate(
        [tiny_image(seed=1), tiny_image(seed=2)], ["What is it?", "Describe it."], max_new_tokens=3
    )
    assert [(s.visual_tokens_before, s.visual_tokens_after, s.partitions) for s in out.stats] == [
        (64, 16, 1)
    ] * 2
    vlm.remove_hired()
    assert vlm.handle is None and "generate" not in model.__dict__


def test_bad_inputs_raise_clear_errors(tmp_path, dense):
    with pytest.raises(ValueError, match="one prompt per image"):
        dense.generate([tiny_image(), tiny_image()], ["only one"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        dense.generate(bad, "hi")
    with pytest.raises(FileNotFoundError, match="missing.jpg' not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((16, 16, 3), 2.0))  # 8 x 8 is now refused for its size first (issue #31)
    with pytest.raises(TypeError, match="PIL images, paths or numpy arrays"):
        load_image(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="max_new_tokens"):
        dense.generate(tiny_image(), "hi", max_new_tokens=0)


def test_unsupported_models_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=32))  # fmt: skip
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        VLM(lm, processor=None)
    lm.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        load_vlm(tmp_path)
    with pytest.raises(ValueError, match="processor"):
        load_vlm(lm)


def test_vista_through_the_api_composes_with_hired(next_folder, dense):
    from mmaccel.vlm import VISTAConfig

    images = [tiny_image(64, 128, seed=6), tiny_image(128, 128, seed=7)]
    prompts = ["What is shown in the image?", "Describe the picture."]
    off = load_vlm(next_folder, vista=VISTAConfig(lam=0.0, gamma=0.0))
    assert off.generate(images, prompts, max_new_tokens=4).texts == dense.generate(images, prompts, 4).texts
    vlm = load_vlm(next_folder, hired=HiREDConfig(budget=TokenBudget(ratio=0.5)), vista=VISTAConfig())
    out = vlm.generate(images, prompts, max_new_tokens=4)
    assert len(out.texts) == 2 and vlm.vista.steering_vectors is not None
    assert vlm.vista.steering_vectors.shape[1] == 2  # one steering vector per sample
    vlm.remove_vista()
    vlm.remove_vista()  # no-op
    assert vlm.vista is None


def test_load_vlm_refuses_a_folder_of_another_kind_before_loading(tmp_path):
    from mmaccel.testing import save_tiny

    folder = save_tiny("dit", tmp_path / "dit")
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration; .* holds DiTPipeline"):
        load_vlm(folder)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_vlm(tmp_path / "missing")
