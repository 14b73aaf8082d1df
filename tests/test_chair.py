"""CHAIR_S / CHAIR_I on hand-made captions with known answers."""

from __future__ import annotations

import pytest

from mmaccel.vlm.eval import COCO_SYNONYMS, chair, extract_objects
from mmaccel.vlm.eval.chair import singularize


def test_every_coco_category_and_no_ambiguous_synonym():
    assert len(COCO_SYNONYMS) == 80
    chair(["a cat"], [["cat"]])  # builds the lookup: raises if a synonym maps to two categories


@pytest.mark.parametrize(
    ("word", "singular"),
    [("dogs", "dog"), ("people", "person"), ("knives", "knife"), ("benches", "bench"), ("buses", "bus"),
     ("puppies", "puppy"), ("horses", "horse"), ("glasses", "glasses"), ("ties", "tie"), ("vases", "vase")],
)  # fmt: skip
def test_singularize(word, singular):
    assert singularize(word) == singular


def test_extract_synonyms_phrases_and_animal_modifiers():
    assert extract_objects("Two men ride motor bikes past a fire hydrant.") == [
        "person",
        "motorcycle",
        "fire hydrant",
    ]
    # phrases win over their words: a hot dog is no dog, a teddy bear no bear
    assert extract_objects("A boy eats a hot dog next to his teddy bear.") == [
        "person",
        "hot dog",
        "teddy bear",
    ]
    # "baby" before an animal names the animal, elsewhere a person
    assert extract_objects("A baby elephant and a baby.") == ["elephant", "person"]
    assert extract_objects("The sofa faces the television; the sofa is red.") == ["couch", "tv", "couch"]
    assert extract_objects("An empty street at night.") == []


def test_chair_known_answers():
    captions = [
        "A man sitting on a sofa with a dog.",  # person, couch ok; dog hallucinated
        "A cat on a laptop keyboard.",  # all present
        "Two giraffes and a zebra near a car and a car.",  # car twice hallucinated
        "A quiet field.",  # no objects
    ]
    truth = [["person", "couch"], ["cat", "laptop", "keyboard"], ["giraffe", "zebra"], ["sheep"]]
    result = chair(captions, truth)
    assert result.mentions == 3 + 3 + 4 + 0
    assert result.hallucinated_mentions == 1 + 0 + 2
    assert result.chair_i == pytest.approx(3 / 10)
    assert result.chair_s == pytest.approx(2 / 4)
    assert result.captions[0].hallucinated == ("dog",)
    assert result.captions[2].mentioned == ("giraffe", "zebra", "car", "car")
    unique = chair(captions, truth, unique=True)
    assert unique.mentions == 3 + 3 + 3 and unique.hallucinated_mentions == 2
    assert unique.chair_i == pytest.approx(2 / 9)


def test_ground_truth_accepts_synonyms_and_rejects_unknown_names():
    assert chair(["Some people on a couch."], [["men", "sofa"]]).chair_s == 0.0
    with pytest.raises(ValueError, match="unicorn"):
        chair(["a cat"], [["unicorn"]])
    with pytest.raises(ValueError, match="one ground-truth list per caption"):
        chair(["a cat", "a dog"], [["cat"]])
    with pytest.raises(TypeError):
        chair(["a cat"], ["cat"])


def test_custom_synonym_map_and_empty_input():
    synonyms = {"widget": ("gadget",), "gizmo": ()}
    result = chair(["A gadget beside two gizmos."], [["widget"]], synonyms=synonyms)
    assert result.captions[0].mentioned == ("widget", "gizmo") and result.chair_s == 1.0
    assert chair([], []).chair_s == 0.0 and chair([], []).chair_i == 0.0
    with pytest.raises(ValueError, match="maps to both"):
        chair(["x"], [[]], synonyms={"a": ("thing",), "b": ("things",)})
