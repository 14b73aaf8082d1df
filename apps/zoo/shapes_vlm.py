"""Shapes VLM: a small LLaVA-NeXT trained from scratch to caption and answer questions about
procedural scenes of coloured shapes (:mod:`mmaccel.apps.zoo.shapes_data`).

Real ``LlavaNextForConditionalGeneration`` (CLIP vision tower with [CLS], anyres partitions,
``image_newline``, a Llama language model) + ``LlavaNextProcessor`` with a word-level Unigram
tokenizer, so HiRED and VISTA run on a model whose attention has learned where the objects are.
Ground-truth object lists make the quality figures exact: QA accuracy (exact match), and CHAIR
(Rohrbach et al., EMNLP 2018) on captions with the 16 colour+shape categories.

    from mmaccel.apps.zoo.shapes_vlm import evaluate, load
    from mmaccel.vlm import load_vlm
    model, processor = load()
    print(evaluate(load_vlm(model, processor=processor), n_questions=20, n_captions=10))
"""

from __future__ import annotations

import math
import string
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmaccel.apps.zoo.shapes_data import (
    CAPTION_PROMPT,
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    SIZE_WEIGHTS,
    SIZES,
    VOCABULARY,
    Scene,
    caption,
    draw_scene,
    make_scene,
    object_name,
    question,
    questions,
)
from mmaccel.testing import LLAVA_CHAT_TEMPLATE, TinyVLM

__all__ = [
    "EVAL_SEED",
    "NAME",
    "PINPOINTS",
    "SHAPES_SYNONYMS",
    "EvalItem",
    "build",
    "build_tokenizer",
    "eval_set",
    "evaluate",
    "load",
    "pretrain_vision",
    "train",
]

NAME = "shapes-vlm"
IMAGE_TOKEN = "<image>"
#: anyres grid for the 64 px base: a square image is 1 + 1 partitions, 2:1 is 1 + 2, 128 px is 1 + 4.
PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]
#: The held-out scenes come from this seed; training draws from ``[seed, 1]`` streams instead.
EVAL_SEED = 20_251_125
#: CHAIR categories: the 16 colour + shape names (plurals are singularised by the CHAIR code).
SHAPES_SYNONYMS: dict[str, tuple[str, ...]] = {object_name(c, s): () for c in COLOURS for s in SHAPES}

_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               image_size=64, patch_size=8, projection_dim=64, num_channels=3)  # fmt: skip
_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
             tie_word_embeddings=False)  # fmt: skip


def build_tokenizer():
    """Word-level Unigram tokenizer: one piece per `VOCABULARY` word (with and without the
    leading ``▁``), the chat roles, and single characters so any ASCII text tokenizes.
    ``<unk>``=0, ``<s>``=1, ``</s>``=2; ``<image>`` and ``<pad>`` at the end; left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("▁", -2.0)] + [(c, -5.0) for c in chars + "\n"] + [("▁" + c, -4.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in VOCABULARY] + [(w, -1.5) for w in VOCABULARY]
    pieces += [("▁USER:", -0.5), ("▁ASSISTANT:", -0.5)]
    specials = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.Unigram([(s, 0.0) for s in specials] + pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.model_max_length = 1024
    return tok


def build(seed: int = 0) -> TinyVLM:
    """A randomly initialised Shapes VLM (the starting point of :func:`train`).

    CLIP tower 64 px / patch 8, 4 layers x 64 wide (feature layer -1, [CLS] dropped), a GELU
    projector and a Llama with 4 layers x 128 (GQA 4:2); anyres over `PINPOINTS`.
    """
    import transformers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    tok = build_tokenizer()
    size = _VISION["image_size"]
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **_TEXT)  # fmt: skip
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION), text_config=text, image_grid_pinpoints=PINPOINTS,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
        image_seq_length=(size // _VISION["patch_size"]) ** 2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    image_cls = (
        getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    )
    processor = LlavaNextProcessor(
        image_processor=image_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, patch_size=_VISION["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    return TinyVLM(model, processor)


def load(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TinyVLM:
    """The committed Shapes VLM (or the one saved at ``path``) as ``(model, processor)``, eval mode."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from mmaccel.apps.zoo import zoo_path

    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str, a Path or None, got {type(path).__name__}")
    folder = zoo_path(NAME) if path is None else Path(path)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    processor = LlavaNextProcessor.from_pretrained(folder)
    return TinyVLM(model.to(device).eval(), processor)


def _prompt(processor: Any, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _example(processor: Any, scene: Scene, turns: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """One multi-turn conversation about ``scene``: the first turn as the chat template writes it
    (what inference sees), later turns as ``</s> USER: q ASSISTANT: a``; labels only on answers + EOS."""
    tok = processor.tokenizer
    first = processor(images=[scene.image], text=[_prompt(processor, turns[0][0])], return_tensors="pt")
    ids = first["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    for i, (q, a) in enumerate(turns):
        if i:
            prompt = tok(f"USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += prompt
            labels += [-100] * len(prompt)
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += answer
        labels += answer
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                pixel_values=first["pixel_values"][0], image_sizes=first["image_sizes"][0])  # fmt: skip


def _collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids / labels and the partition axis of ``pixel_values`` (the model slices it back)."""
    n = max(len(e["input_ids"]) for e in examples)
    parts = max(e["pixel_values"].shape[0] for e in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    pixels = torch.zeros((len(examples), parts, *examples[0]["pixel_values"].shape[1:]))
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = e["input_ids"], e["labels"], 1
        pixels[i, : e["pixel_values"].shape[0]] = e["pixel_values"]
    sizes = torch.stack([e["image_sizes"] for e in examples])
    return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)


def _training_batch(processor: Any, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
    """``batch_size`` fresh scenes of one size (no padding waste), each with its caption and one
    question of every kind it supports."""
    size = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    examples = []
    for _ in range(batch_size):
        scene = make_scene(rng, size=size)
        turns = questions(scene.objects, rng) + [(CAPTION_PROMPT, caption(scene.objects))]
        examples.append(_example(processor, scene, [turns[i] for i in rng.permutation(len(turns))]))
    return _collate(examples, processor.tokenizer.pad_token_id)


@dataclass(frozen=True)
class EvalItem:
    """One held-out prompt: its scene, the prompt, the exact answer (the caption for captions), its kind."""

    scene: Scene
    prompt: str
    answer: str
    kind: str


def eval_set(
    n_questions: int = 200, n_captions: int = 100, seed: int = EVAL_SEED
) -> tuple[list[EvalItem], list[EvalItem]]:
    """The fixed held-out set: ``n_questions`` questions (kinds in turn, one scene each) and
    ``n_captions`` caption prompts on other scenes; a prefix of a larger set is the smaller set."""
    for name, value in (("n_questions", n_questions), ("n_captions", n_captions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    q_rng, c_rng = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
    qa: list[EvalItem] = []
    while len(qa) < n_questions:
        kind = QUESTION_KINDS[len(qa) % len(QUESTION_KINDS)]
        scene = make_scene(q_rng)
        pair = question(scene.objects, kind, q_rng)
        if pair is not None:
            qa.append(EvalItem(scene, *pair, kind))
    caps = []
    for _ in range(n_captions):
        scene = make_scene(c_rng)
        caps.append(EvalItem(scene, CAPTION_PROMPT, caption(scene.objects), "caption"))
    return qa, caps


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace("?", " ").split())


def caption_scores(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, object recall and exact match of ``captions`` against ``scenes``.

    An object mention is a colour + shape pair; it is hallucinated when the scene has no object
    of that colour and shape. Count errors ("two" for one) are not hallucinations for CHAIR;
    they show in ``caption exact match`` (the whole canonical caption, counts included).
    Recall = ground-truth categories mentioned / ground-truth categories, over all captions.
    """
    from mmaccel.vlm.eval.chair import chair

    if len(captions) != len(scenes):
        raise ValueError(f"need one scene per caption, got {len(captions)} and {len(scenes)}")
    truths = [{object_name(o.colour, o.shape) for o in s.objects} for s in scenes]
    result = chair(captions, truths, synonyms=SHAPES_SYNONYMS)
    found = sum(len(t & set(r.mentioned)) for t, r in zip(truths, result.captions))
    exact = sum(_normalise(c) == _normalise(caption(s.objects)) for c, s in zip(captions, scenes))
    return {
        "CHAIR_i": result.chair_i,
        "CHAIR_s": result.chair_s,
        "object recall": found / max(sum(len(t) for t in truths), 1),
        "caption exact match": exact / max(len(captions), 1),
    }


def _generate(
    vlm: Any, items: Sequence[EvalItem], max_new_tokens: int, batch_size: int
) -> tuple[list[str], list[int]]:
    texts, visual = [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        out = vlm.generate(
            [it.scene.image for it in chunk], [it.prompt for it in chunk], max_new_tokens=max_new_tokens
        )
        texts += out.texts
        visual += [s.visual_tokens_after for s in out.stats]
    return texts, visual


def evaluate(
    vlm: Any, *, n_questions: int = 200, n_captions: int = 100, batch_size: int = 16, seed: int = EVAL_SEED
) -> dict[str, float]:
    """Greedy answers of ``vlm`` (a :class:`mmaccel.vlm.api.VLM`, with or without HiRED / VISTA) on the
    held-out `eval_set`: QA accuracy (exact match after lower-casing and dropping ``.?``), per
    question kind, the :func:`caption_scores` of the captions, and mean visual tokens per image."""
    from mmaccel.vlm.api import VLM

    if not isinstance(vlm, VLM):
        raise TypeError(f"vlm must be a mmaccel.vlm.api.VLM (see vlm.load_vlm), got {type(vlm).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    qa, caps = eval_set(n_questions, n_captions, seed)
    metrics: dict[str, float] = {}
    visual: list[int] = []
    if qa:
        answers, v = _generate(vlm, qa, 4, batch_size)
        visual += v
        right = [_normalise(a) == it.answer for a, it in zip(answers, qa)]
        metrics["QA accuracy"] = sum(right) / len(qa)
        per_kind: dict[str, list[bool]] = defaultdict(list)
        for ok, it in zip(right, qa):
            per_kind[it.kind].append(ok)
        metrics.update({f"QA accuracy ({k})": sum(v) / len(v) for k, v in per_kind.items()})
    if caps:
        texts, v = _generate(vlm, caps, 40, batch_size)
        visual += v
        metrics.update(caption_scores(texts, [it.scene for it in caps]))
    metrics["visual tokens / image"] = float(np.mean(visual)) if visual else 0.0
    return metrics


def _patch_example(
    processor: Any, rng: np.random.Generator, patch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64 px view (a whole 64x64 scene or a crop of a 128x128 one, as the base partition and the
    anyres crops see them) normalised as the processor does, with per-patch colour and shape
    targets (0 = background; an object labels a patch it covers with >= 6 pixels)."""
    side = _VISION["image_size"]
    height = width = side * int(rng.integers(1, 3))
    scene = make_scene(rng, size=(height, width))
    ip = processor.image_processor
    image = torch.tensor(np.asarray(scene.image), dtype=torch.float32).permute(2, 0, 1) / 255
    image = (image - torch.tensor(ip.image_mean).view(3, 1, 1)) / torch.tensor(ip.image_std).view(3, 1, 1)
    bg = np.array(scene.background)
    masks = torch.stack(
        [torch.from_numpy((np.asarray(draw_scene([o], height, width, scene.background)) != bg).any(-1))
         for o in scene.objects]
    )  # fmt: skip
    y, x = (int(v) for v in rng.integers(0, height - side + 1, 2))
    image, masks = image[:, y : y + side, x : x + side], masks[:, y : y + side, x : x + side]
    n = side // patch
    cover = masks.float().reshape(len(scene.objects), n, patch, n, patch).sum((2, 4))
    best, hit = cover.argmax(0), cover.amax(0) >= 6
    colour = torch.tensor([list(COLOURS).index(o.colour) + 1 for o in scene.objects])[best] * hit
    shape = torch.tensor([SHAPES.index(o.shape) + 1 for o in scene.objects])[best] * hit
    return image, colour.flatten(), shape.flatten()


def presence_targets(colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Multi-label image-level targets from per-patch labels: (..., 16) floats, 1 where some patch
    shows that colour + shape pair (index ``(colour - 1) * len(SHAPES) + shape - 1``)."""
    pair = (colour - 1) * len(SHAPES) + (shape - 1)
    hit = (colour > 0) & (shape > 0)
    out = torch.zeros(*colour.shape[:-1], len(COLOURS) * len(SHAPES))
    return out.scatter_add_(-1, torch.where(hit, pair, 0), hit.float()).clamp_max(1.0)


def pretrain_vision(
    model: Any, processor: Any, rng: np.random.Generator, *, steps: int = 4000, batch_size: int = 32,
    lr: float = 3e-3, progress: bool = True, cls_objective: bool = True,
) -> float:
    """Supervision for the vision tower before the VLM sees it: a linear head on every patch of
    the feature layer predicts the colour and shape of the object under it (a from-scratch ViT does
    not learn shapes from the language loss alone in a CPU budget), and with ``cls_objective`` a
    linear head on the [CLS] token predicts which of the 16 colour + shape pairs the view shows
    (multi-label, binary cross-entropy), so [CLS] has an image-level meaning as CLIP's has (on by
    default: the committed weights were trained with it, see docs/zoo.md). Returns the held-out
    patch shape accuracy on object patches; the heads are discarded."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, 2 * (len(SHAPES) + 1))
    cls_head = torch.nn.Linear(tower.config.hidden_size, len(COLOURS) * len(SHAPES))
    params = [*tower.parameters(), *head.parameters()] + ([*cls_head.parameters()] if cls_objective else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(steps // 40, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    patch, k = tower.config.patch_size, len(COLOURS) + 1

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [_patch_example(processor, rng, patch) for _ in range(n)]
        return tuple(torch.stack(t) for t in zip(*items))  # type: ignore[return-value]

    def features(images: torch.Tensor) -> torch.Tensor:
        return tower(pixel_values=images, output_hidden_states=True).hidden_states[-1]

    def logits(images: torch.Tensor) -> torch.Tensor:
        return head(features(images)[:, 1:])

    tower.train()
    for _ in tqdm(range(steps), desc=f"pretrain {NAME} vision tower", disable=not progress):
        images, colour, shape = batch(batch_size)
        hidden = features(images)
        out = head(hidden[:, 1:])
        loss = F.cross_entropy(out[..., :k].flatten(0, 1), colour.flatten()) + F.cross_entropy(
            out[..., k:].flatten(0, 1), shape.flatten()
        )
        if cls_objective:
            loss = loss + F.binary_cross_entropy_with_logits(cls_head(hidden[:, 0]), presence_targets(colour, shape))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    tower.eval()
    images, _, shape = batch(200)
    with torch.no_grad():
        predicted = logits(images)[..., k:].argmax(-1)
    return (predicted == shape)[shape > 0].float().mean().item()


def train(
    output: Path,
    *,
    seed: int = 0,
    progress: bool = True,
    steps: int = 3200,
    batch_size: int = 8,
    lr: float = 2e-3,
    cls_objective: bool = True,
    vision_steps: int = 4000,
    name: str = NAME,
) -> dict[str, float | int | str]:
    """Train from scratch on fresh scenes (AdamW, warm-up + cosine, loss on answer tokens only,
    teacher forcing), evaluate on the held-out set, save model + processor and the model card
    (of zoo entry ``name``: the same recipe is registered under other seeds too).
    The vision tower is first pretrained alone for ``vision_steps`` (:func:`pretrain_vision`, with
    its [CLS] objective when ``cls_objective``)."""
    from mmaccel.apps.zoo.card import write_model_card
    from mmaccel.vlm.api import load_vlm

    for param, value in (("steps", steps), ("batch_size", batch_size), ("vision_steps", vision_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{param} must be an int >= 1, got {value!r}")
    if not isinstance(cls_objective, bool):
        raise TypeError(f"cls_objective must be a bool, got {type(cls_objective).__name__}")
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model, processor = build(seed)
    rng = np.random.default_rng([seed, 1])
    patch_accuracy = pretrain_vision(
        model, processor, np.random.default_rng([seed, 4]), steps=vision_steps, progress=progress,
        cls_objective=cls_objective,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    model.train()
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress)
    for _ in bar:
        loss = model(**_training_batch(processor, rng, batch_size)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    train_cpu = time.process_time() - cpu_start
    metrics: dict[str, float | int | str] = dict(evaluate(load_vlm(model, processor=processor)))
    metrics["vision pretraining: patch shape accuracy"] = patch_accuracy
    metrics["final training loss"] = float(loss.item())
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["training CPU minutes"] = round(train_cpu / 60, 1)
    output = Path(output)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    write_model_card(
        output,
        name=name,
        summary="A tiny LLaVA-NeXT that captions and answers questions about synthetic scenes of "
        "coloured shapes. mmaccel uses it to measure what HiRED token dropping and VISTA steering "
        "do to answers and object hallucination (CHAIR), with exact ground truth.",
        architecture="`LlavaNextForConditionalGeneration`: CLIP vision tower (64 px, patch 8, 4 layers x 64, "
        "[CLS] + 64 patch tokens, feature layer -1), GELU projector, Llama language model (4 layers x 128, "
        "GQA 4:2 heads, MLP 256), anyres pinpoints 64x64 / 64x128 / 128x64 / 128x128 (2-5 partitions of 64 "
        "tokens + `image_newline`). `LlavaNextProcessor` with a word-level Unigram tokenizer and the LLaVA-1.5 "
        "chat template (`USER: <image>\\n... ASSISTANT:`).",
        data="Scenes drawn by `apps/zoo/shapes_data.py`: 1-6 non-overlapping shapes (circle, square, triangle, "
        "star) in red / green / blue / yellow on a plain grey background, 64x64 (40%), 64x128, 128x64, 128x128 "
        "(20% each). Each training scene is one conversation: the caption (`describe the image.` -> `two red "
        "circles and one blue square.`, canonical colour/shape order) and one question of each supported kind "
        "(count, is-there, colour-of, shape-of, total), in random order. Evaluation uses separate scenes "
        f"(seed {EVAL_SEED}): 200 questions (kinds in turn) and 100 captions, greedy decoding.",
        training=f"Stage 1, vision tower alone: {vision_steps} steps of 32 64-px views (whole 64x64 scenes or crops of "
        "128x128 ones), a linear head on every patch predicting the colour and shape under it (cross-entropy)"
        + (" plus a linear head on [CLS] predicting which of the 16 colour + shape pairs the view shows "
           "(multi-label, binary cross-entropy: an image-level objective for [CLS], as CLIP's has)"
           if cls_objective else "")
        + (", AdamW lr 3e-3 (cosine); the heads are then discarded. " if cls_objective
           else ", AdamW lr 3e-3 (cosine); the head is then discarded. ")
        + "Stage 2, the whole model "
        f"from there, AdamW lr {lr} (5% warm-up, cosine), weight decay 0.01, "
        f"batch {batch_size} fresh scenes, {steps} steps, gradient clipping 1.0, cross-entropy on answer "
        f"tokens + EOS only (teacher forcing).",
        metrics=metrics,
        seed=seed,
        train_seconds=time.perf_counter() - start,
        limitations="Knows 4 colours x 4 shapes and the prompt templates above, nothing else. CHAIR here counts "
        "a colour+shape mention absent from the scene; wrong counts of present objects are not CHAIR "
        "hallucinations (they show in caption exact match).",
    )
    return metrics
