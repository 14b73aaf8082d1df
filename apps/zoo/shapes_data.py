"""Procedural scenes of coloured shapes with exact ground truth, captions and questions.

A scene is 1-6 non-overlapping, non-touching shapes (circle, square, triangle, star) in one of
four colours (red, green, blue, yellow) on a plain light background, drawn without
anti-aliasing so every object pixel has exactly its colour. Sizes 64x64, 64x128, 128x64 and
128x128 exercise LLaVA-NeXT's anyres partitions; shapes scale with the shorter side. The
ground-truth object list gives the canonical caption ("two red circles and one blue square.")
and exact answers to the question templates below, so CHAIR and QA accuracy need no annotator.

    from mmaccel.apps.zoo.shapes_data import make_scene, caption, questions
    scene = make_scene(np.random.default_rng(0))
    caption(scene.objects), questions(scene.objects, np.random.default_rng(1))
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CAPTION_PROMPT",
    "COLOURS",
    "NUMBERS",
    "QUESTION_KINDS",
    "SHAPES",
    "SIZES",
    "VOCABULARY",
    "Scene",
    "ShapeObject",
    "caption",
    "draw_scene",
    "make_scene",
    "object_name",
    "question",
    "questions",
]

#: colour name -> RGB (exact: drawing has no anti-aliasing).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 200, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
#: (height, width) of the generated images and their sampling weights (small ones are cheaper).
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (64, 128), (128, 64), (128, 128))
SIZE_WEIGHTS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
MAX_OBJECTS = 6
CAPTION_PROMPT = "describe the image."
#: question kinds in the order :func:`question` cycles through them.
QUESTION_KINDS: tuple[str, ...] = ("count", "exists", "colour", "shape", "total")

#: every word the prompts and answers use (the tokenizer gets one piece per word).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS]
        + "describe the image how many is there a what colour shape object shapes are yes no and".split()
    )
)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: colour and shape names, centre (x, y) and bounding radius in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]


def object_name(colour: str, shape: str) -> str:
    """The CHAIR category of an object: ``"red circle"``."""
    return f"{colour} {shape}"


def _polygon(obj: ShapeObject) -> list[tuple[float, float]]:
    """Vertices of a square / triangle / star whose circumradius is ``obj.radius``."""
    r, x, y = obj.radius, obj.x, obj.y
    if obj.shape == "square":
        h = r / math.sqrt(2)
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if obj.shape == "triangle":
        angles = [-90.0, 30.0, 150.0]
        return [(x + r * math.cos(math.radians(a)), y + r * math.sin(math.radians(a))) for a in angles]
    points = []  # star: 5 outer points, inner radius 0.45 r
    for i in range(10):
        rad = r if i % 2 == 0 else 0.45 * r
        a = math.radians(-90.0 + 36.0 * i)
        points.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    return points


def draw_scene(
    objects: Sequence[ShapeObject], height: int, width: int, background: tuple[int, int, int]
) -> Image.Image:
    """Render ``objects`` on a plain ``background`` (no anti-aliasing: exact colours)."""
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        if obj.colour not in COLOURS or obj.shape not in SHAPES:
            raise ValueError(f"unknown object {obj.colour!r} {obj.shape!r}")
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            r = obj.radius
            draw.ellipse([obj.x - r, obj.y - r, obj.x + r, obj.y + r], fill=fill)
        else:
            draw.polygon(_polygon(obj), fill=fill)
    return image


def make_scene(
    rng: np.random.Generator, size: tuple[int, int] | None = None, n_objects: int | None = None
) -> Scene:
    """A random scene: ``size`` (height, width) from `SIZES` and 1-6 objects unless given.

    Objects keep a 2 px gap between bounding circles, so each is one connected region of its
    colour. Radii are 7.5-11 px per 64 px of the shorter side (smaller ones fit crowded scenes).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    if size is None:
        size = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s >= 32 for s in size)):
        raise ValueError(f"size must be a (height, width) tuple of ints >= 32, got {size!r}")
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if isinstance(n_objects, bool) or not isinstance(n_objects, int) or not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be an int in [1, {MAX_OBJECTS}], got {n_objects!r}")
    height, width = size
    scale = min(height, width) / 64
    colours, shapes = list(COLOURS), list(SHAPES)
    while True:  # rejection sampling of a whole layout; 6 objects in 64x64 fit within a few tries
        placed: list[ShapeObject] = []
        for _ in range(n_objects):
            for _attempt in range(100):
                r = float(rng.uniform(7.5, 11.0)) * scale
                x, y = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
                if all(math.hypot(x - o.x, y - o.y) >= r + o.radius + 2 for o in placed):
                    obj = ShapeObject(
                        colours[rng.integers(4)], shapes[rng.integers(4)], float(x), float(y), r
                    )
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == n_objects:
            break
    grey = int(rng.integers(225, 256))
    background = (grey, grey, grey)
    return Scene(draw_scene(placed, height, width, background), tuple(placed), background)


def _counts(objects: Sequence[ShapeObject]) -> Counter:
    return Counter((o.colour, o.shape) for o in objects)


def _phrase(count: int, colour: str, shape: str) -> str:
    return f"{NUMBERS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def caption(objects: Sequence[ShapeObject]) -> str:
    """The canonical caption: groups by colour then shape in `COLOURS` / `SHAPES` order."""
    if not objects:
        raise ValueError("a caption needs at least one object")
    counts = _counts(objects)
    parts = [_phrase(counts[c, s], c, s) for c in COLOURS for s in SHAPES if counts[c, s]]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def question(objects: Sequence[ShapeObject], kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of ``kind`` (see `QUESTION_KINDS`) or ``None`` if the scene has none.

    ``count``: "how many red circles?" (a present combination 70% of the time, else any);
    ``exists``: "is there a green triangle?" (yes / no with equal odds when possible);
    ``colour``: "what colour is the square?" (only when exactly one square);
    ``shape``: "what shape is the blue object?" (only when exactly one blue object);
    ``total``: "how many shapes are there?".
    """
    counts = _counts(objects)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    present = [k for k in combos if counts[k]]
    absent = [k for k in combos if not counts[k]]
    if kind == "count":
        pool = present if rng.random() < 0.7 or not absent else combos
        c, s = pool[rng.integers(len(pool))]
        return f"how many {c} {s}s?", NUMBERS[counts[c, s]]
    if kind == "exists":
        pool = present if (rng.random() < 0.5 or not absent) else absent
        c, s = pool[rng.integers(len(pool))]
        return f"is there a {c} {s}?", "yes" if counts[c, s] else "no"
    if kind == "colour":
        single = [s for s in SHAPES if sum(o.shape == s for o in objects) == 1]
        if not single:
            return None
        s = single[rng.integers(len(single))]
        return f"what colour is the {s}?", next(o.colour for o in objects if o.shape == s)
    if kind == "shape":
        single = [c for c in COLOURS if sum(o.colour == c for o in objects) == 1]
        if not single:
            return None
        c = single[rng.integers(len(single))]
        return f"what shape is the {c} object?", next(o.shape for o in objects if o.colour == c)
    if kind == "total":
        return "how many shapes are there?", NUMBERS[len(objects)]
    raise ValueError(f"kind must be one of {QUESTION_KINDS}, got {kind!r}")


def questions(objects: Sequence[ShapeObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    """One question of every kind the scene supports, in random order."""
    pairs = [q for kind in QUESTION_KINDS if (q := question(objects, kind, rng)) is not None]
    return [pairs[i] for i in rng.permutation(len(pairs))]
