"""HiRED: budgeted visual-token dropping for LLaVA-1.5 / LLaVA-NeXT, batched.

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models" (AAAI 2025). For each image, a budget ``B`` of its
visual tokens is kept: the base image gets ``floor(alpha * B)`` (capped by its size); the rest
is split over the anyres crops as the reference code does: the top ``int(N * (1 - alpha))`` of
the base image's ``N`` tokens by early-layer (``content_layer``) [CLS] attention are counted
per crop region of the base image, and the crop share follows those counts
(:func:`mmaccel.runtime.budget.allocate`: exact, capacity-aware). Inside every partition the
tokens with the highest [CLS] attention at the feature layer are kept, in their original order.

Differences from the public code, on purpose (docs/vlm.md lists them all): the budget is used
exactly (no flooring loss), the [CLS] row is computed from the layer's q/k projections without an
attention matrix (:mod:`mmaccel.vlm.cls_attention`), batches of images with different partition
counts work, and ``image_newline`` is kept after every row of the crop grid that keeps at least
one token (``keep_newlines=True``; the public code drops all). Newlines are layout markers, not
visual tokens: they do not count against the budget. ``crop_regions="strips"`` (default) cuts the
base image into the reference's contiguous raster strips; ``"tiles"`` uses the crops' real 2-D
footprints. The selection runs for the whole batch on the model's device without host reads
(:mod:`mmaccel.vlm.hired_select`); ``selection="diverse"`` picks tokens inside each partition's
budget by max-min diversity of the projected features instead (DivPrune's rule).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmaccel.runtime.adapters import llava
from mmaccel.runtime.budget import TokenBudget, allocate
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats
from mmaccel.vlm.cls_attention import ClsAttentionRecorder
from mmaccel.vlm.hired_select import NEWLINE, BatchLayout, ImageLayout, crop_regions_of, select_batch
from mmaccel.vlm.placeholders import shrink_placeholders

__all__ = [
    "HiREDConfig",
    "HiREDHandle",
    "HiREDPatch",
    "HiREDStats",
    "ImageSelection",
    "apply_hired",
    "crop_content_counts",
    "select_visual_tokens",
]

CROP_REGIONS = ("strips", "tiles")
SELECTIONS = ("cls", "diverse")


@dataclass(frozen=True)
class HiREDConfig:
    """HiRED knobs.

    ``budget``: visual tokens kept per image (ratio of, or count out of, its patch tokens).
    ``alpha`` in [0, 1]: share of the budget for the base (full) image of an anyres input.
    ``content_layer``: ViT layer whose [CLS] attention ranks the crops (paper: 0).
    ``select_layer``: ViT layer whose [CLS] attention picks tokens; ``None`` = the layer whose
    output LLaVA uses (``vision_feature_layer=-2`` -> layer 22 of CLIP-L's 24).
    ``keep_newlines``: keep LLaVA-NeXT's row-end ``image_newline`` after rows that keep a token.
    ``crop_regions``: how the base image is cut into one region per crop when counting its
    top early-layer tokens: ``"strips"`` (reference code: contiguous runs of the flattened
    grid) or ``"tiles"`` (each crop's 2-D footprint on the base grid).
    ``selection``: how tokens are picked inside each partition's budget: ``"cls"`` (reference:
    highest ``select_layer`` [CLS] attention) or ``"diverse"`` (DivPrune's greedy max-min cosine
    diversity of the projected features, Alvar et al., CVPR 2025; needs no attention scores).
    """

    budget: TokenBudget = field(default_factory=lambda: TokenBudget(ratio=0.2))
    alpha: float = 0.5
    content_layer: int = 0
    select_layer: int | None = None
    keep_newlines: bool = True
    crop_regions: str = "strips"
    selection: str = "cls"

    def __post_init__(self) -> None:
        if not isinstance(self.budget, TokenBudget):
            raise TypeError(f"budget must be a runtime.TokenBudget, got {type(self.budget).__name__}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a float in [0, 1], got {type(self.alpha).__name__}")
        if not 0.0 <= self.alpha <= 1.0 or math.isnan(self.alpha):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        for name in ("content_layer", "select_layer"):
            value = getattr(self, name)
            if value is None and name == "select_layer":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"{name} must be an int layer index (negative counts from the end), got {value!r}"
                )
        if not isinstance(self.keep_newlines, bool):
            raise TypeError(f"keep_newlines must be a bool, got {type(self.keep_newlines).__name__}")
        if self.crop_regions not in CROP_REGIONS:
            raise ValueError(f"crop_regions must be one of {CROP_REGIONS}, got {self.crop_regions!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")


@dataclass(frozen=True)
class ImageSelection:
    """What HiRED kept of one image: ``keep`` masks the image's LLM positions (newlines included),
    ``kept`` (partitions,) counts the tokens kept per partition. Both stay on the model's device;
    the int properties read them on the host when asked."""

    keep: torch.Tensor
    budget: int
    kept: torch.Tensor
    tokens_per_partition: tuple[int, ...]

    @property
    def kept_per_partition(self) -> tuple[int, ...]:
        return tuple(self.kept.tolist())

    @property
    def partitions(self) -> int:
        return len(self.tokens_per_partition)

    @property
    def tokens_before(self) -> int:
        return int(self.keep.numel())

    @property
    def tokens_after(self) -> int:
        return int(self.keep.sum())


def crop_content_counts(
    base_content: torch.Tensor,
    crops: int,
    alpha: float,
    regions: str = "strips",
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Content score of each crop, as the reference code computes it.

    ``base_content`` (N,): the base image's early-layer [CLS] attention in raster order. Its
    top ``int(N * (1 - alpha))`` tokens are counted per crop region: ``"strips"`` cuts the
    flattened grid into ``crops`` contiguous runs (token ``j`` -> region ``j * crops // N``, the
    reference's reshape when ``crops`` divides ``N``); ``"tiles"`` maps base-grid cell (r, c) of
    the square ``g x g`` grid to crop ``(r * rows // g) * cols + c * cols // g`` of the
    ``grid = (rows, cols)`` crop grid. Returns (crops,) float64 counts.
    """
    n = base_content.numel()
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    k = int(n * (1 - alpha))
    top = torch.zeros(n, dtype=torch.bool)
    if k > 0:
        top[torch.topk(base_content.double().cpu(), k).indices] = True
    region = crop_regions_of(n, crops, regions, grid)
    return torch.zeros(crops, dtype=torch.float64).index_add_(0, region[top], torch.ones(k, dtype=torch.float64))


def select_visual_tokens(
    partition: torch.Tensor,
    content: torch.Tensor,
    select: torch.Tensor,
    budget: TokenBudget,
    alpha: float = 0.5,
    keep_newlines: bool = True,
    crop_regions: str = "strips",
    grid: tuple[int, int] | None = None,
) -> ImageSelection:
    """HiRED's selection for one image laid out as the LLM sees it (the rule, on the host).

    :class:`HiREDPatch` runs the batched device version (:mod:`mmaccel.vlm.hired_select`), which
    the tests hold equal to this one.

    ``partition`` (L,) long: 0 = base image, 1..P-1 = crops, ``NEWLINE`` (-1) = row-end
    newline; ``content`` / ``select`` (L,): early- / feature-layer [CLS] attention of each
    token within its own partition (only the base image's ``content`` is read: it ranks the
    crops through :func:`crop_content_counts`, with ``crop_regions`` and the crop ``grid``).
    Returns the keep mask and per-partition counts.
    """
    partition = partition.long().cpu()
    content, select = content.double().cpu(), select.double().cpu()
    is_token = partition != NEWLINE
    n_parts = int(partition.max()) + 1
    sizes = torch.bincount(partition[is_token], minlength=n_parts)
    total = budget.resolve(int(sizes.sum()))
    kept = torch.zeros(n_parts, dtype=torch.long)
    if n_parts == 1:
        kept[0] = total
    else:
        kept[0] = min(math.floor(alpha * total), int(sizes[0]))
        mass = crop_content_counts(content[partition == 0], n_parts - 1, alpha, crop_regions, grid)
        kept[1:] = allocate(total - int(kept[0]), mass, sizes[1:])
        kept[0] += total - int(kept.sum())  # crops full: the base takes the rest (fits, total <= L)
    keep = torch.zeros_like(partition, dtype=torch.bool)
    for p in range(n_parts):
        idx = (partition == p).nonzero().squeeze(1)
        order = torch.sort(select[idx], descending=True, stable=True).indices[: int(kept[p])]
        keep[idx[order]] = True
    newline = ~is_token
    if newline.any() and keep_newlines:
        # A newline closes the row of tokens since the previous newline; in multi-partition
        # images the base image precedes the crop grid without newlines and belongs to no row.
        row = torch.cumsum(newline.long(), 0) - newline.long()
        in_row = is_token & ((partition != 0) | (n_parts == 1))
        rows_with_kept = torch.zeros(int(row.max()) + 1, dtype=torch.bool)
        rows_with_kept[row[in_row & keep]] = True
        keep[newline] = rows_with_kept[row[newline]]
    return ImageSelection(keep, total, kept, tuple(sizes.tolist()))


class HiREDPatch:
    """The hooks HiRED installs on one LLaVA instance (see :func:`apply_hired`)."""

    def __init__(self, model: nn.Module, config: HiREDConfig) -> None:
        self.model = model
        self.config = config
        self.base = model.model
        self.is_next = llava.is_next(model)
        llava.check_default_strategy(model.config.vision_feature_select_strategy, "HiRED")
        layers = llava.vision_attention_layers(model, "HiRED")
        n = len(layers)
        self.content_layer = llava.layer_index("content_layer", config.content_layer, n)
        select = config.select_layer
        if select is None:
            select = llava.feature_layer_index(model, n, "HiREDConfig.select_layer")
        self.select_layer = llava.layer_index("select_layer", select, n)
        scored = [self.content_layer] if config.selection == "diverse" else [self.content_layer, self.select_layer]
        self.recorder = ClsAttentionRecorder([layer.self_attn for layer in layers], scored)
        self._layouts: dict[tuple[Any, ...], ImageLayout] = {}  # per image size: the layout is host-only
        self._batches: OrderedDict[tuple[Any, ...], BatchLayout] = OrderedDict()  # per batch, on the device
        self.image_token_id = llava.image_token_id(model)
        self.pad_token_id = llava.pad_token_id(model)  # re-padded positions are masked out
        self.last_selections: list[ImageSelection] = []
        self.stats = HiREDStats()
        self._orig_features = self.base.get_image_features
        self._orig_forward = model.forward
        self._orig_generate = model.generate
        self._forward_sig = inspect.signature(self._orig_forward)

    # -- vision side ---------------------------------------------------------------------
    def encode(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: Any = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> tuple[Any, list[ImageSelection]]:
        """Run the original image encoder with scoring on; return (pruned output, selections)."""
        strategy = vision_feature_select_strategy or self.model.config.vision_feature_select_strategy
        llava.check_default_strategy(strategy, "HiRED")
        call = dict(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy=strategy, **kwargs)  # fmt: skip
        if image_sizes is not None:
            call["image_sizes"] = image_sizes
        self.recorder.reset()
        self.recorder.active = True
        try:
            out = self._orig_features(**call)
        finally:
            self.recorder.active = False
        scores = self.recorder.scores
        content = scores[self.content_layer][:, 1:]  # drop [CLS] as the features do
        select = scores[self.select_layer][:, 1:] if self.select_layer in scores else None
        self.recorder.reset()
        features = list(out.pooler_output)
        cfg = self.config
        layout = self.batch_layout(image_sizes, len(features), content.shape[0], content.shape[1], content.device)
        for i, feat in enumerate(features):
            if feat.shape[0] != layout.lengths[i]:
                raise RuntimeError(f"image {i}: {feat.shape[0]} features but a {layout.lengths[i]}-token layout")
        packed = None
        if cfg.selection == "diverse":
            packed = nn.utils.rnn.pad_sequence(features, batch_first=True)
        keep, kept = select_batch(layout, content, select, cfg.alpha, cfg.keep_newlines, packed)
        # The one host read: how many positions each image keeps, when kept newlines make it
        # depend on the selection; otherwise it is the budget.
        counts = keep.sum(1).tolist() if cfg.keep_newlines and layout.has_newlines else list(layout.totals)
        order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices
        selections = []
        for i, (feat, sizes) in enumerate(zip(features, layout.part_sizes)):
            features[i] = feat.index_select(0, order[i, : counts[i]].to(feat.device))
            selections.append(ImageSelection(keep[i, : layout.lengths[i]], layout.totals[i], kept[i, : len(sizes)], sizes))
        out.pooler_output = features
        self.last_selections = selections
        self.stats.record(selections, counts)
        return out, selections

    def batch_layout(
        self, image_sizes: torch.Tensor | None, n_images: int, passes: int, n: int, device: Any = "cpu"
    ) -> BatchLayout:
        """The batch's packed layouts and budgets on ``device``: built on the host from the image
        sizes (per image size, cached) and kept per batch shape and device (LRU, 64 entries), so a
        repeated batch shape neither rebuilds nor copies anything."""
        if not self.is_next or image_sizes is None:
            if passes != n_images:
                raise NotImplementedError(
                    "HiRED on LLaVA supports one tower pass per image (no image_sizes split)"
                )
            keys = ((None, 1, n),) * n_images
        else:
            sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(x) for x in image_sizes]
            counts = llava.partitions_per_image(self.model, sizes)
            keys = tuple((tuple(int(v) for v in size), c, n) for size, c in zip(sizes, counts))
        key = (keys, str(device))
        if key in self._batches:
            self._batches.move_to_end(key)
            return self._batches[key]
        images = [self._image_layout(*k) for k in keys]
        layout = BatchLayout.build(images, n, self.config.budget, self.config.alpha).to(device)
        self._batches[key] = layout
        if len(self._batches) > 64:
            self._batches.popitem(last=False)
        return layout

    def _image_layout(self, size: tuple[int, ...] | None, parts: int, n: int) -> ImageLayout:
        key = (size, parts, n)
        if key not in self._layouts:
            if size is None:
                part, source = torch.zeros(n, dtype=torch.long), torch.arange(n)
            else:  # the model's own packing, applied to [partition, index] pairs on the host
                meta = torch.stack([torch.arange(parts).repeat_interleave(n), torch.arange(parts * n)], -1)
                marker = torch.tensor([NEWLINE, 0], dtype=torch.float64)
                (packed,), _ = self.base.pack_image_features(
                    [meta.double().view(parts, n, 2)], torch.tensor([size]), vision_feature_select_strategy="default",
                    image_newline=marker,
                )  # fmt: skip
                part, source = packed[:, 0].long(), packed[:, 1].long()
            if parts == 1:
                region = torch.zeros(n, dtype=torch.long)
            else:
                grid = llava.anyres_grid(self.model, list(size)) if self.config.crop_regions == "tiles" else None
                region = crop_regions_of(n, parts - 1, self.config.crop_regions, grid)
            self._layouts[key] = ImageLayout.of(part, source, region)
        return self._layouts[key]

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(self._orig_features).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        return self.encode(**arguments)[0]

    # -- language side -------------------------------------------------------------------
    def prepare(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Encode + prune the images in ``kwargs`` and shrink the per-token tensors to match."""
        kwargs = dict(kwargs)
        if kwargs.get("mm_encoder_outputs") is not None:
            raise ValueError(
                "pass either pixel_values or mm_encoder_outputs to a HiRED-patched model, not both"
            )
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise NotImplementedError(
                "HiRED needs input_ids to drop <image> positions; inputs_embeds is not supported"
            )
        out, selections = self.encode(
            kwargs.pop("pixel_values"),
            kwargs.pop("image_sizes", None),
            kwargs.pop("vision_feature_layer", None),
            kwargs.pop("vision_feature_select_strategy", None),
        )
        keep = torch.cat([s.keep for s in selections])
        shrunk = shrink_placeholders(
            input_ids, keep, self.image_token_id, pad_token_id=self.pad_token_id,
            attention_mask=kwargs.pop("attention_mask", None), position_ids=kwargs.pop("position_ids", None),
            labels=kwargs.pop("labels", None),
        )  # fmt: skip
        kwargs.update(shrunk)
        kwargs["mm_encoder_outputs"] = {"image": out}
        return kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._forward_sig.bind_partial(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        if arguments.get("pixel_values") is None:
            return self._orig_forward(**arguments)
        return self._orig_forward(**self.prepare(arguments))

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get("pixel_values") is None:
            return self._orig_generate(inputs, **kwargs)
        if inputs is not None:
            kwargs["input_ids"] = inputs
        original = kwargs.get("input_ids")
        prepared = self.prepare(kwargs)
        short_len = prepared["input_ids"].shape[1]
        out = self._orig_generate(**prepared)
        # Give back the caller's own prompt so ``out[:, prompt_len:]`` means what it did before.
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = original.repeat_interleave(sequences.shape[0] // original.shape[0], dim=0).to(sequences)
        sequences = torch.cat([prompt, sequences[:, short_len:]], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out


class HiREDStats(Stats):
    """What HiRED kept since the last :meth:`reset`: images encoded, visual tokens (LLM positions,
    newlines included) before / after, partitions, and the spread of crop budgets. Device counts
    are summed on the device and read on the host only by :meth:`summary`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.encodes = 0
        self.images = 0
        self.partitions = 0
        self.tokens_before = 0
        self.tokens_after = 0
        self._crops: list[torch.Tensor] = []  # device tensors, read by summary()

    def record(self, selections: list[ImageSelection], counts: list[int]) -> None:
        """One encode: its selections and the positions each image kept (host ints)."""
        self.encodes += 1
        self.images += len(selections)
        self.partitions += sum(s.partitions for s in selections)
        self.tokens_before += sum(int(s.keep.shape[0]) for s in selections)
        self.tokens_after += sum(counts)
        self._crops += [s.kept[1:] for s in selections if s.partitions > 1]

    def summary(self) -> dict[str, int | float | None]:
        after = self.tokens_after
        crops = torch.cat([c.cpu() for c in self._crops]) if self._crops else None
        return {
            "encodes": self.encodes,
            "images": self.images,
            "partitions": self.partitions,
            "visual_tokens_before": self.tokens_before,
            "visual_tokens_after": after,
            "kept_ratio": after / self.tokens_before if self.tokens_before else None,
            "crop_budget_min": int(crops.min()) if crops is not None else None,
            "crop_budget_max": int(crops.max()) if crops is not None else None,
        }


#: the model attribute holding the active `HiREDPatch` (attention rebalancing maps its scores
#: onto the positions HiRED kept)
PATCH_ATTR = "_mmaccel_hired"


class HiREDHandle(PatchHandle):
    """A :class:`~mmaccel.runtime.patching.PatchHandle` exposing the last selections and ``stats``."""

    hired: HiREDPatch
    stats: HiREDStats

    @property
    def last_selections(self) -> list[ImageSelection]:
        """One :class:`ImageSelection` per image of the most recent encode."""
        return self.hired.last_selections


def apply_hired(model: nn.Module, config: HiREDConfig | None = None) -> HiREDHandle:
    """Install HiRED on a LLaVA-1.5 / LLaVA-NeXT instance; ``handle.remove()`` restores it.

    Patches the instance's ``model.get_image_features`` (score + prune), ``forward`` and
    ``generate`` (drop the pruned ``<image>`` positions from ``input_ids`` / ``attention_mask``
    / ``position_ids`` / ``labels`` per sample, so batched, KV-cached generation works), plus
    forward hooks on the scored layers' ``q_proj`` / ``k_proj``. ``generate`` returns the
    caller's original prompt followed by the new tokens.
    """
    llava.require(model, "apply_hired")
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        import transformers

        raise ImportError(
            f"apply_hired needs transformers >= 5.18 (forward(mm_encoder_outputs=...) hands the pruned "
            f"features to the model); this is transformers {transformers.__version__}"
        )
    config = resolve_config(config, HiREDConfig)
    patch = HiREDPatch(model, config)  # validates before anything is changed
    handle = HiREDHandle(model, "hired")
    handle.hired = patch
    handle.stats = patch.stats
    for hook in patch.recorder.install():
        handle.add_torch_hook(hook)
    handle.set_attr(patch.base, "get_image_features", _wrap(patch._orig_features, patch.get_image_features))
    handle.set_attr(model, "forward", _wrap(patch._orig_forward, patch.forward))
    handle.set_attr(model, "generate", _wrap(patch._orig_generate, patch.generate))
    handle.set_attr(model, PATCH_ATTR, patch)  # other techniques read what HiRED kept (last_selections)
    return handle


def _wrap(original: Any, impl: Any) -> Any:
    """A function calling ``impl`` that carries ``original``'s name and signature (transformers
    inspects ``forward``'s parameters, e.g. to find ``mm_encoder_outputs``)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return impl(*args, **kwargs)

    return wrapper
