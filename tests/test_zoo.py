"""The zoo registry, its CLI, the card writer and the shared digit classifier."""

from __future__ import annotations

import json

import pytest
import torch

from mmaccel.apps.cli import main
from mmaccel.apps.zoo import REGISTRY, ZOO_DIR, train_model, zoo_path
from mmaccel.apps.zoo.card import DISCLAIMER, write_model_card
from mmaccel.apps.zoo.digits import (
    DigitClassifier,
    classifier_accuracy,
    digit_images,
    digit_split,
    frechet_distance,
    load_digit_classifier,
)


def test_registry_modules_expose_the_contract():
    from mmaccel.apps.zoo import zoo_module

    for name in REGISTRY:
        module = zoo_module(name)
        assert module.NAME == name
        assert callable(module.train) and callable(module.load)


def test_zoo_path_errors():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo_path("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        zoo_path(3)
    with pytest.raises(ValueError, match="seed"):
        train_model("digit-classifier", seed=-1)


def test_committed_weights_fit_the_size_budget():
    files = list(ZOO_DIR.rglob("*.safetensors"))
    assert files, "no committed zoo weights"
    assert sum(f.stat().st_size for f in files) <= 60 * 2**20
    for name in REGISTRY:
        card = (zoo_path(name) / "README.md").read_text()
        assert DISCLAIMER in card and f"mmaccel zoo train {name}" in card


def test_cli_path_and_list(capsys):
    assert main(["zoo", "path", "digit-classifier"]) == 0
    assert capsys.readouterr().out.strip() == str(ZOO_DIR / "digit-classifier")
    assert main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in REGISTRY)


def test_cli_missing_weights_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mmaccel.apps.zoo.ZOO_DIR", tmp_path)
    assert main(["zoo", "path", "digits-dit"]) == 2
    err = capsys.readouterr().err
    assert "mmaccel zoo train digits-dit" in err and "Traceback" not in err


def test_cli_train_writes_a_loadable_model(tmp_path, capsys, monkeypatch):
    import mmaccel.apps.zoo.digits as digits

    real_train = digits.train
    monkeypatch.setattr(digits, "train", lambda output, **kw: real_train(output, steps=5, **kw))
    assert main(["zoo", "train", "digit-classifier", "--output", str(tmp_path), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "digit-classifier" and 0 <= report["test accuracy (360 held-out digits)"] <= 1
    model = DigitClassifier.from_pretrained(str(tmp_path))
    assert isinstance(model, DigitClassifier)
    assert "testing and demonstration" in (tmp_path / "README.md").read_text()


def test_cli_train_seed_defaults_to_the_committed_weights(tmp_path, capsys, monkeypatch):
    import mmaccel.apps.zoo.digits as digits

    seeds = []
    monkeypatch.setattr(digits, "train", lambda output, *, seed, progress: seeds.append(seed) or {})
    for extra in ([], ["--seed", "3"]):
        assert main(["zoo", "train", "digit-classifier", "--output", str(tmp_path), "--quiet", *extra]) == 0
    assert seeds == [0, 3]
    capsys.readouterr()


def test_card_rejects_empty_fields(tmp_path):
    with pytest.raises(ValueError, match="summary"):
        write_model_card(tmp_path, name="x", summary=" ", architecture="a", data="d", training="t",
                         metrics={}, seed=0, train_seconds=1.0)  # fmt: skip


def test_digit_data_and_split():
    images, labels = digit_images(32)
    assert images.shape == (1797, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    train_idx, test_idx = digit_split()
    assert len(train_idx) == 1437 and len(test_idx) == 360
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    with pytest.raises(ValueError, match="size"):
        digit_images(4)


def test_committed_classifier_recognises_held_out_digits():
    clf = load_digit_classifier()
    images, labels = digit_images(32)
    _, test_idx = digit_split()
    assert classifier_accuracy(clf, images[test_idx], labels[test_idx]) >= 0.95
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        clf(torch.zeros(2, 3, 32, 32))


def test_frechet_distance_properties():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=gen)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(6.0, rel=1e-6)  # mean shift of 1 in 6 dims, same covariance
    assert frechet_distance(a, 2 * a) > 0
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(a, a[:, :3])
