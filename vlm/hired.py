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
footprints.
"""

from __future__ import annotations

import functools
import inspect
import math
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
NEWLINE = -1  # partition id marking LLaVA-NeXT's image_newline positions


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
    """

    budget: TokenBudget = field(default_factory=lambda: TokenBudget(ratio=0.2))
    alpha: float = 0.5
    content_layer: int = 0
    select_layer: int | None = None
    keep_newlines: bool = True
    crop_regions: str = "strips"

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


@dataclass(frozen=True)
class ImageSelection:
    """What HiRED kept of one image: ``keep`` masks the image's LLM positions (newlines included)."""

    keep: torch.Tensor
    budget: int
    kept_per_partition: tuple[int, ...]
    tokens_per_partition: tuple[int, ...]

    @property
    def partitions(self) -> int:
        return len(self.kept_per_partition)

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
    j = torch.arange(n)
    if regions == "strips":
        region = j * crops // n
    elif regions == "tiles":
        if grid is None or grid[0] * grid[1] != crops:
            raise ValueError(f"grid must be (rows, cols) with rows * cols = {crops} crops, got {grid!r}")
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"crop_regions='tiles' needs a square base grid, got {n} tokens")
        rows, cols = grid
        region = (j // g * rows // g) * cols + (j % g) * cols // g
    else:
        raise ValueError(f"crop_regions must be one of {CROP_REGIONS}, got {regions!r}")
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
    """HiRED's selection for one image laid out as the LLM sees it.

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
    return ImageSelection(keep, total, tuple(kept.tolist()), tuple(sizes.tolist()))


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
        self.recorder = ClsAttentionRecorder(
            [layer.self_attn for layer in layers], [self.content_layer, self.select_layer]
        )
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
        content = self.recorder.scores[self.content_layer][:, 1:]  # drop [CLS] as the features do
        select = self.recorder.scores[self.select_layer][:, 1:]
        self.recorder.reset()
        features = list(out.pooler_output)
        metas = self._layout(content, select, image_sizes, len(features))
        grids = (
            [llava.anyres_grid(self.model, s) for s in image_sizes]
            if self.is_next and image_sizes is not None
            else [None] * len(metas)
        )
        cfg = self.config
        selections = [
            select_visual_tokens(
                m[:, 0].round().long(), m[:, 1], m[:, 2], cfg.budget, cfg.alpha, cfg.keep_newlines,
                cfg.crop_regions, grid,
            )  # fmt: skip
            for m, grid in zip(metas, grids)
        ]
        for i, (feat, sel) in enumerate(zip(features, selections)):
            if feat.shape[0] != sel.keep.numel():
                raise RuntimeError(
                    f"image {i}: {feat.shape[0]} features but a {sel.keep.numel()}-token layout"
                )
            features[i] = feat[sel.keep.to(feat.device)]
        out.pooler_output = features
        self.last_selections = selections
        self.stats.record(selections)
        return out, selections

    def _layout(
        self, content: torch.Tensor, select: torch.Tensor, image_sizes: torch.Tensor | None, n_images: int
    ) -> list[torch.Tensor]:
        """Per image, (L, 3) rows [partition, content score, select score] in the LLM's token order."""
        if not self.is_next:
            if content.shape[0] != n_images:
                raise NotImplementedError(
                    "HiRED on LLaVA supports one tower pass per image (no image_sizes split)"
                )
            zeros = torch.zeros_like(content)
            return list(torch.stack([zeros, content, select], -1).double())
        counts = llava.partitions_per_image(self.model, image_sizes)
        metas = []
        for c, s in zip(content.split(counts), select.split(counts)):
            part = torch.arange(c.shape[0], dtype=c.dtype, device=c.device)[:, None].expand_as(c)
            metas.append(torch.stack([part, c, s], -1).double())
        marker = torch.tensor([NEWLINE, 0.0, 0.0], dtype=torch.float64, device=content.device)
        packed, _ = self.base.pack_image_features(
            metas, image_sizes, vision_feature_select_strategy="default", image_newline=marker
        )
        return [p.cpu() for p in packed]

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
    newlines included) before / after, partitions, and the spread of crop budgets."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.encodes = 0
        self.images = 0
        self.partitions = 0
        self.tokens_before = 0
        self.tokens_after = 0
        self.crop_budget_min: int | None = None
        self.crop_budget_max: int | None = None

    def record(self, selections: list[ImageSelection]) -> None:
        self.encodes += 1
        for sel in selections:
            self.images += 1
            self.partitions += sel.partitions
            self.tokens_before += sel.tokens_before
            self.tokens_after += sel.tokens_after
            crops = sel.kept_per_partition[1:]
            if crops:
                low, high = min(crops), max(crops)
                self.crop_budget_min = low if self.crop_budget_min is None else min(self.crop_budget_min, low)
                self.crop_budget_max = high if self.crop_budget_max is None else max(self.crop_budget_max, high)

    def summary(self) -> dict[str, int | float | None]:
        return {
            "encodes": self.encodes,
            "images": self.images,
            "partitions": self.partitions,
            "visual_tokens_before": self.tokens_before,
            "visual_tokens_after": self.tokens_after,
            "kept_ratio": self.tokens_after / self.tokens_before if self.tokens_before else None,
            "crop_budget_min": self.crop_budget_min,
            "crop_budget_max": self.crop_budget_max,
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
