"""CHAIR: object-hallucination rates of captions against ground-truth object lists.

Rohrbach et al., "Object Hallucination in Image Captioning" (EMNLP 2018). A caption's
objects are the words (and two-word phrases) that a synonym map sends to an object category,
after lower-casing and singularising; an object is hallucinated when its category is not in
the image's ground truth.

* ``CHAIR_I`` = hallucinated object mentions / all object mentions;
* ``CHAIR_S`` = captions with at least one hallucinated object / all captions.

:data:`COCO_SYNONYMS` follows the CHAIR scheme for the 80 MSCOCO categories (a condensed
version of its synonym list): phrases beat single words ("hot dog" is not a dog, "teddy
bear" not a bear), and "baby" / "adult" / "young" before an animal name the animal, not a
person. Mentions count with repetition, as the reference script does (``unique=True``
counts each category once per caption).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["COCO_SYNONYMS", "CaptionReport", "ChairResult", "chair", "extract_objects", "singularize"]

#: category -> synonyms (the category name itself always counts). Phrases are space-separated.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider",
               "baby", "worker", "passenger", "sister", "brother", "biker", "policeman", "cop", "officer",
               "lady", "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother", "father",
               "gentleman", "pitcher", "player", "skier", "snowboarder", "skater", "skateboarder",
               "surfer", "catcher", "batter", "umpire", "friend", "teammate", "student", "teenager",
               "tourist", "pedestrian", "driver", "doctor", "soldier", "shopper", "toddler", "infant",
               "athlete", "spectator", "customer", "crowd"),
    "bicycle": ("bike", "unicycle", "minibike", "trike", "cycle"),
    "car": ("automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe",
            "taxicab", "limo", "limousine", "taxi"),
    "motorcycle": ("motor bike", "motor cycle", "motorbike", "scooter", "moped"),
    "airplane": ("jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane",
                 "seaplane", "airliner"),
    "bus": ("minibus", "trolley", "double decker"),
    "train": ("locomotive", "tramway", "caboose", "tram"),
    "truck": ("pickup", "lorry", "hauler", "firetruck", "fire truck"),
    "boat": ("ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
             "skiff", "yacht", "kayak", "catamaran", "houseboat", "vessel", "rowboat", "trawler",
             "ferryboat", "tugboat", "schooner", "barge", "ferry", "paddleboat", "lifeboat", "freighter"),
    "traffic light": ("street light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": ("meter",),
    "bench": ("pew",),
    "bird": ("ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
             "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "blackbird",
             "woodpecker", "egret", "gull", "swan", "flamingo", "parrot", "pheasant", "rooster",
             "crow", "raven", "turkey", "peacock", "vulture", "eagle", "hawk", "chicken"),
    "cat": ("kitten", "feline", "tabby", "kitty"),
    "dog": ("puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
            "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt",
            "doggy", "spaniel", "bulldog", "sheepdog", "corgi", "greyhound", "retriever", "hound", "husky"),
    "horse": ("colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "mustang", "bronco"),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": ("cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "bison"),
    "elephant": (),
    "bear": ("grizzly", "cub"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack", "rucksack"),
    "umbrella": ("parasol",),
    "handbag": ("wallet", "purse", "briefcase"),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball", "football", "soccer ball", "baseball", "basketball", "tennis ball"),
    "kite": (),
    "baseball bat": (),
    "baseball glove": ("glove", "mitt"),
    "skateboard": (),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("racket", "racquet"),
    "bottle": (),
    "wine glass": (),
    "cup": ("mug",),
    "fork": (),
    "knife": ("pocketknife",),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "sub", "cheeseburger", "hamburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog",),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("seat", "stool"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee"),
    "potted plant": ("houseplant", "house plant"),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty", "toilet seat"),
    "tv": ("monitor", "television", "tv screen"),
    "laptop": ("computer", "notebook", "netbook", "macbook"),
    "mouse": (),
    "remote": ("remote control", "controller"),
    "keyboard": (),
    "cell phone": ("mobile phone", "phone", "cellphone", "telephone", "smartphone", "iphone"),
    "microwave": (),
    "oven": ("stovetop", "stove", "stove top"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": ("novel", "textbook"),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear", "teddy"),
    "hair drier": ("hairdryer", "hair dryer", "blow dryer", "blowdryer", "blow drier", "dryer"),
    "toothbrush": (),
}  # fmt: skip

_ANIMALS = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
_AGE_WORDS = {"baby", "adult", "young"}

_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox", "knives": "knife",
    "wives": "wife", "leaves": "leaf", "shelves": "shelf", "calves": "calf", "wolves": "wolf",
    "loaves": "loaf", "buses": "bus", "potatoes": "potato", "tomatoes": "tomato", "ties": "tie",
    "pies": "pie", "skis": "ski", "dice": "die", "cacti": "cactus",
}  # fmt: skip
_UNCHANGED = {"scissors", "glasses", "series", "species", "sheep", "news", "pants", "jeans", "shorts",
              "bus", "grass", "glass"}  # fmt: skip


def singularize(word: str) -> str:
    """English singular of a lower-case word (irregulars + suffix rules; enough for object nouns)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _UNCHANGED or len(word) <= 3 or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def _lookup(synonyms: Mapping[str, Sequence[str]]) -> tuple[dict[str, str], int]:
    """phrase -> category, and the longest phrase's word count."""
    table: dict[str, str] = {}
    for category, words in synonyms.items():
        for phrase in (category, *words):
            key = " ".join(singularize(w) for w in phrase.lower().split())
            if table.setdefault(key, category) != category:
                raise ValueError(f"synonym {phrase!r} maps to both {table[key]!r} and {category!r}")
    return table, max(len(k.split()) for k in table)


def _words(text: str) -> list[str]:
    return [singularize(w) for w in re.findall(r"[a-z]+", text.lower())]


def extract_objects(caption: str, synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS) -> list[str]:
    """Object categories mentioned in ``caption``, in order, with repetition."""
    table, longest = _lookup(synonyms)
    return _extract(_words(caption), table, longest)


def _extract(words: list[str], table: dict[str, str], longest: int) -> list[str]:
    found = []
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):  # longest phrase first
            category = table.get(" ".join(words[i : i + n]))
            if category is None:
                continue
            following = table.get(words[i + 1]) if n == 1 and i + 1 < len(words) else None
            if words[i] in _AGE_WORDS and following in _ANIMALS:
                break  # "baby elephant" is an elephant, not a person
            found.append(category)
            i += n - 1
            break
        i += 1
    return found


@dataclass(frozen=True)
class CaptionReport:
    """One caption's object mentions (categories, in order) and the hallucinated ones."""

    mentioned: tuple[str, ...]
    hallucinated: tuple[str, ...]


@dataclass(frozen=True)
class ChairResult:
    """``chair_s`` / ``chair_i`` in [0, 1] (0 when there is nothing to count) and per-caption reports."""

    chair_s: float
    chair_i: float
    mentions: int
    hallucinated_mentions: int
    captions: tuple[CaptionReport, ...]


def chair(
    captions: Sequence[str],
    ground_truth: Sequence[Iterable[str]],
    synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS,
    unique: bool = False,
) -> ChairResult:
    """CHAIR_S and CHAIR_I of ``captions[i]`` against the objects ``ground_truth[i]``.

    Ground-truth objects may be categories or any synonym ("men", "sofa"); a name the map does
    not know raises ``ValueError`` (it would otherwise make every mention of it a hallucination).
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not one string")
    if len(captions) != len(ground_truth):
        raise ValueError(
            f"need one ground-truth list per caption, got {len(captions)} and {len(ground_truth)}"
        )
    table, longest = _lookup(synonyms)
    reports = []
    for caption, objects in zip(captions, ground_truth):
        if isinstance(objects, str):
            raise TypeError(
                f"each ground truth must be a collection of object names, got the string {objects!r}"
            )
        truth = set()
        for name in objects:
            category = table.get(" ".join(_words(name)))
            if category is None:
                raise ValueError(
                    f"ground-truth object {name!r} is not a category or synonym in the synonym map"
                )
            truth.add(category)
        mentioned = _extract(_words(caption), table, longest)
        if unique:
            mentioned = list(dict.fromkeys(mentioned))
        reports.append(CaptionReport(tuple(mentioned), tuple(m for m in mentioned if m not in truth)))
    mentions = sum(len(r.mentioned) for r in reports)
    wrong = sum(len(r.hallucinated) for r in reports)
    sentences = sum(bool(r.hallucinated) for r in reports)
    return ChairResult(
        chair_s=sentences / len(reports) if reports else 0.0,
        chair_i=wrong / mentions if mentions else 0.0,
        mentions=mentions,
        hallucinated_mentions=wrong,
        captions=tuple(reports),
    )
