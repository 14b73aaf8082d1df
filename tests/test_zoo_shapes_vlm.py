"""Shapes VLM zoo entry: scene ground truth, training examples, and the committed weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mmaccel.apps.zoo import zoo_module, zoo_path
from mmaccel.apps.zoo.shapes_data import (
    COLOURS,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    draw_scene,
    make_scene,
    question,
)
from mmaccel.apps.zoo.shapes_vlm import (
    _training_batch,
    build,
    caption_scores,
    eval_set,
    evaluate,
    load,
    train,
)
from mmaccel.runtime.budget import TokenBudget
from mmaccel.vlm import HiREDConfig, load_vlm

#: Measured on the committed weights over the 200 held-out questions: 0.655 overall, 0.875 on
#: "how many shapes are there?" and 0.825 on "what shape is the X object?" (apps/zoo/models/
#: shapes-vlm/README.md); answering every kind with its most frequent answer, without the image,
#: scores 0.415, 0.225 and 0.4. Thresholds keep a margin and stay above those baselines.
MIN_QA_ACCURACY = 0.6
MIN_TOTAL_COUNT_ACCURACY = 0.8
MIN_SHAPE_ACCURACY = 0.75


@pytest.fixture(scope="module")
def shapes_vlm():
    return load()


@pytest.mark.parametrize("seed", range(8))
def test_scene_ground_truth_matches_drawn_pixels(seed):
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, size=SIZES[seed % len(SIZES)])
    pixels = np.asarray(scene.image)
    assert pixels.shape[:2] == SIZES[seed % len(SIZES)]
    for name, rgb in COLOURS.items():
        mask = (pixels == np.array(rgb)).all(-1)
        _, regions = ndimage.label(mask, structure=np.ones((3, 3)))
        assert regions == sum(o.colour == name for o in scene.objects), name
    background = (pixels == np.array(scene.background)).all(-1)
    assert (
        background.sum() + sum((pixels == np.array(c)).all(-1).sum() for c in COLOURS.values())
        == background.size
    )


def test_caption_and_answers_follow_the_objects():
    objects = [ShapeObject("blue", "square", 10, 10, 6), ShapeObject("red", "circle", 30, 30, 6),
               ShapeObject("red", "circle", 50, 50, 6)]  # fmt: skip
    assert caption(objects) == "two red circles and one blue square."
    rng = np.random.default_rng(0)
    assert question(objects, "total", rng) == ("how many shapes are there?", "three")
    assert question(objects, "colour", rng) == ("what colour is the square?", "blue")
    assert question(objects, "shape", rng) == ("what shape is the blue object?", "square")
    assert question(objects, "colour", rng) is not None
    assert question(objects[1:], "colour", rng) is None  # two circles, no single shape
    for _ in range(20):
        q, a = question(objects, "count", rng)
        colour, shape = q.removeprefix("how many ").removesuffix("s?").split()
        assert a == ("zero", "one", "two")[sum(o.colour == colour and o.shape == shape for o in objects)]


def test_caption_scores_count_hallucinations_exactly():
    objects = (ShapeObject("red", "circle", 10, 10, 6), ShapeObject("blue", "star", 40, 40, 6))
    scene = Scene(draw_scene(objects, 64, 64, (240, 240, 240)), objects, (240, 240, 240))
    scores = caption_scores(["one red circle and two green stars.", caption(objects)], [scene, scene])
    assert scores["CHAIR_i"] == pytest.approx(1 / 4) and scores["CHAIR_s"] == pytest.approx(1 / 2)
    assert scores["object recall"] == pytest.approx(3 / 4) and scores["caption exact match"] == 0.5


def test_vision_pretraining_targets_follow_the_objects():
    from mmaccel.apps.zoo.shapes_vlm import _patch_example, pretrain_vision

    model, processor = build(0)
    rng = np.random.default_rng(3)
    image, colour, shape = _patch_example(processor, rng, 8)
    assert image.shape == (3, 64, 64) and colour.shape == shape.shape == (64,)
    assert torch.equal(colour > 0, shape > 0) and 0 < int((shape > 0).sum()) < 64
    accuracy = pretrain_vision(model, processor, rng, steps=2, batch_size=2, progress=False)
    assert 0.0 <= accuracy <= 1.0


def test_cls_presence_targets_and_objective():
    from mmaccel.apps.zoo.shapes_vlm import _patch_example, presence_targets, pretrain_vision

    colour = torch.tensor([[0, 1, 1, 4], [2, 0, 0, 0]])
    shape = torch.tensor([[0, 2, 2, 4], [1, 0, 0, 0]])
    targets = presence_targets(colour, shape)  # pairs: (red, shape 2), (colour 4, shape 4); (colour 2, shape 1)
    assert targets.shape == (2, 16) and targets.max() == 1.0
    assert targets[0].nonzero().squeeze(1).tolist() == [1, 15] and targets[1].nonzero().squeeze(1).tolist() == [4]
    _, c, sh = _patch_example(build(0).processor, np.random.default_rng(5), 8)
    assert int(presence_targets(c, sh).sum()) == len({(int(a), int(b)) for a, b in zip(c, sh) if a > 0})
    after = {}
    for objective in (False, True):
        model, processor = build(0)
        torch.manual_seed(0)
        pretrain_vision(model, processor, np.random.default_rng(3), steps=2, batch_size=2, progress=False,
                        cls_objective=objective)  # fmt: skip
        tower = model.model.vision_tower
        after[objective] = getattr(tower, "vision_model", tower).embeddings.class_embedding.detach().clone()
    assert not torch.equal(after[False], after[True])  # the [CLS] head's loss reaches the tower


def test_training_labels_cover_only_answers():
    model, processor = build(0)
    batch = _training_batch(processor, np.random.default_rng(0), 2)
    tok = processor.tokenizer
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        supervised = tok.decode(ids[labels != -100])
        assert supervised.count("</s>") == (ids == tok.convert_tokens_to_ids("▁ASSISTANT:")).sum()
        assert "USER" not in supervised and "<image>" not in supervised
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("name", ["shapes-vlm", "shapes-vlm-seed1"])  # the same bars for both seeds
def test_committed_model_answers_held_out_questions(name):
    model, processor = zoo_module(name).load()
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    metrics = evaluate(load_vlm(model, processor=processor), n_questions=200, n_captions=0)
    assert metrics["QA accuracy"] >= MIN_QA_ACCURACY, metrics
    assert metrics["QA accuracy (total)"] >= MIN_TOTAL_COUNT_ACCURACY, metrics
    assert metrics["QA accuracy (shape)"] >= MIN_SHAPE_ACCURACY, metrics


def test_load_vlm_from_zoo_path_and_full_budget_hired_is_exact(shapes_vlm):
    dense = load_vlm(zoo_path("shapes-vlm"))
    hired = load_vlm(zoo_path("shapes-vlm"), hired=HiREDConfig(budget=TokenBudget(ratio=1.0)))
    _, caps = eval_set(0, 4)
    images, prompts = [it.scene.image for it in caps], [it.prompt for it in caps]
    a, b = (
        dense.generate(images, prompts, max_new_tokens=24),
        hired.generate(images, prompts, max_new_tokens=24),
    )
    assert a.texts == b.texts
    assert [s.visual_tokens_after for s in a.stats] == [s.visual_tokens_after for s in b.stats]
    assert {s.partitions for s in a.stats} >= {2}


def test_bad_input_raises(shapes_vlm):
    with pytest.raises(TypeError, match="rng"):
        make_scene(0)
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(np.random.default_rng(0), n_objects=7)
    with pytest.raises(ValueError, match="size"):
        make_scene(np.random.default_rng(0), size=(16, 64))
    with pytest.raises(ValueError, match="kind"):
        question([ShapeObject("red", "circle", 5, 5, 3)], "size", np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_questions"):
        eval_set(-1, 0)
    with pytest.raises(TypeError, match="vlm"):
        evaluate(shapes_vlm.model)
    with pytest.raises(TypeError, match="path"):
        load(3)
    with pytest.raises(ValueError, match="vision_steps"):  # checked before anything is built
        train(zoo_path("shapes-vlm") / "never-written", vision_steps=0)
    with pytest.raises(TypeError, match="cls_objective"):
        train(zoo_path("shapes-vlm") / "never-written", cls_objective=1)


def test_train_writes_the_card_of_the_entry_it_is_given(tmp_path, monkeypatch):
    import mmaccel.apps.zoo.shapes_vlm as shapes_vlm

    monkeypatch.setattr(shapes_vlm, "evaluate", lambda vlm: {"QA accuracy": 0.0})  # a 1-step model: skip eval
    metrics = train(
        tmp_path, seed=1, progress=False, steps=1, batch_size=1, vision_steps=1, name="shapes-vlm-seed1"
    )
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# shapes-vlm-seed1\n") and "mmaccel zoo train shapes-vlm-seed1 --seed 1" in card
    assert metrics["QA accuracy"] == 0.0 and load(tmp_path).model.config.text_config.num_hidden_layers == 4


def test_seed1_entry_is_the_recipe_from_another_seed(shapes_vlm, tmp_path, monkeypatch, capsys):
    import mmaccel.apps.zoo.shapes_vlm as shapes_vlm_module
    from mmaccel.apps.cli import main
    from mmaccel.apps.zoo import shapes_vlm_seed1

    card = (zoo_path("shapes-vlm-seed1") / "README.md").read_text()
    assert card.startswith("# shapes-vlm-seed1\n") and "mmaccel zoo train shapes-vlm-seed1 --seed 1" in card
    a, b = shapes_vlm.model.state_dict(), shapes_vlm_seed1.load().model.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    calls = []
    monkeypatch.setattr(shapes_vlm_module, "train", lambda output, **kw: calls.append(kw) or {})
    assert main(["zoo", "train", "shapes-vlm-seed1", "--output", str(tmp_path), "--quiet"]) == 0
    assert calls == [dict(seed=1, progress=False, name="shapes-vlm-seed1")]  # the committed weights' seed
    capsys.readouterr()
