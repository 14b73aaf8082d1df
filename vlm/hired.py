"""HiRED: budgeted visual-token dropping for LLaVA-1.5 / LLaVA-NeXT, batched.

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models" (AAAI 2025). For each image, a budget ``B`` of its
visual tokens is kept: the base image gets ``floor(alpha * B)`` (capped by its size), the rest
is split over the anyres crops in proportion to their early-layer [CLS]-attention mass
(:func:`mmaccel.runtime.budget.allocate`: exact, capacity-aware), and inside every partition the tokens
with the highest [CLS] attention at the feature layer are kept, in their original order.

Differences from the public code, on purpose: the budget is used exactly (no flooring loss),
crops are the real 2-D tiles (after LLaVA-NeXT's unpadding), the [CLS] row is computed from the
layer's q/k projections without an attention matrix (:mod:`mmaccel.vlm.cls_attention`), batches of
images with different partition counts work, and ``image_newline`` is kept after every row of
the crop grid that keeps at least one token (``keep_newlines=True``; the public code drops all).
Newlines are layout markers, not visual tokens: they do not count against the budget.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmaccel.runtime.budget import TokenBudget, allocate
from mmaccel.runtime.patching import PatchHandle
from mmaccel.vlm.cls_attention import ClsAttentionRecorder
from mmaccel.vlm.placeholders import shrink_placeholders

__all__ = [
    "HiREDConfig",
    "HiREDHandle",
    "HiREDPatch",
    "ImageSelection",
    "SUPPORTED_MODELS",
    "apply_hired",
    "select_visual_tokens",
]

SUPPORTED_MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
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
    """

    budget: TokenBudget = field(default_factory=lambda: TokenBudget(ratio=0.2))
    alpha: float = 0.5
    content_layer: int = 0
    select_layer: int | None = None
    keep_newlines: bool = True

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


def select_visual_tokens(
    partition: torch.Tensor,
    content: torch.Tensor,
    select: torch.Tensor,
    budget: TokenBudget,
    alpha: float = 0.5,
    keep_newlines: bool = True,
) -> ImageSelection:
    """HiRED's selection for one image laid out as the LLM sees it.

    ``partition`` (L,) long: 0 = base image, 1..P-1 = crops, ``NEWLINE`` (-1) = row-end
    newline; ``content`` / ``select`` (L,): early- / feature-layer [CLS] attention of each
    token within its own partition. Returns the keep mask and per-partition counts.
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
        mass = torch.zeros(n_parts, dtype=torch.float64).index_add_(0, partition[is_token], content[is_token])
        kept[1:] = allocate(total - int(kept[0]), mass[1:], sizes[1:])
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


def _vision_layers(tower: nn.Module) -> nn.ModuleList:
    inner = getattr(tower, "vision_model", tower)
    has_cls = getattr(getattr(inner, "embeddings", None), "class_embedding", None) is not None
    if not has_cls:
        raise NotImplementedError(
            f"HiRED ranks tokens by [CLS] attention, and the vision tower {type(tower).__name__} has no "
            "[CLS] token (e.g. SigLIP); the mean-received-attention fallback is not implemented yet"
        )
    layers = inner.encoder.layers
    for layer in layers:
        attn = layer.self_attn
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
            raise NotImplementedError(
                f"HiRED needs q_proj/k_proj attention in the tower, got {type(attn).__name__}"
            )
    return layers


def _check_strategy(strategy: str) -> None:
    if strategy != "default":
        raise NotImplementedError(
            f"HiRED supports vision_feature_select_strategy='default' ([CLS] dropped), got {strategy!r}"
        )


def _layer_index(name: str, value: int, n: int) -> int:
    if not -n <= value < n:
        raise ValueError(f"{name} must be in [-{n}, {n - 1}] for this {n}-layer vision tower, got {value}")
    return value % n


def _default_select_layer(feature_layer: Any, n: int) -> int:
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"vision_feature_layer is {feature_layer!r}; pass HiREDConfig(select_layer=...) explicitly"
        )
    hidden_index = feature_layer % (n + 1)  # hidden_states[h] is the output of layer h - 1
    if hidden_index == 0:
        raise ValueError("vision_feature_layer selects the embeddings; pass HiREDConfig(select_layer=...)")
    return hidden_index - 1


class HiREDPatch:
    """The hooks HiRED installs on one LLaVA instance (see :func:`apply_hired`)."""

    def __init__(self, model: nn.Module, config: HiREDConfig) -> None:
        self.model = model
        self.config = config
        self.base = model.model
        self.is_next = type(model).__name__ == "LlavaNextForConditionalGeneration"
        _check_strategy(model.config.vision_feature_select_strategy)
        layers = _vision_layers(self.base.vision_tower)
        n = len(layers)
        self.content_layer = _layer_index("content_layer", config.content_layer, n)
        select = config.select_layer
        if select is None:
            select = _default_select_layer(model.config.vision_feature_layer, n)
        self.select_layer = _layer_index("select_layer", select, n)
        self.recorder = ClsAttentionRecorder(
            [layer.self_attn for layer in layers], [self.content_layer, self.select_layer]
        )
        self.image_token_id = model.config.image_token_id
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = getattr(model.config.get_text_config(), "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)  # re-padded positions are masked out
        self.last_selections: list[ImageSelection] = []
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
        _check_strategy(strategy)
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
        selections = [
            select_visual_tokens(
                m[:, 0].round().long(),
                m[:, 1],
                m[:, 2],
                self.config.budget,
                self.config.alpha,
                self.config.keep_newlines,
            )
            for m in metas
        ]
        for i, (feat, sel) in enumerate(zip(features, selections)):
            if feat.shape[0] != sel.keep.numel():
                raise RuntimeError(
                    f"image {i}: {feat.shape[0]} features but a {sel.keep.numel()}-token layout"
                )
            features[i] = feat[sel.keep.to(feat.device)]
        out.pooler_output = features
        self.last_selections = selections
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
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        counts = [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for s in image_sizes
        ]
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


class HiREDHandle(PatchHandle):
    """A :class:`~mmaccel.runtime.patching.PatchHandle` that also exposes the last selections."""

    hired: HiREDPatch

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
    if type(model).__name__ not in SUPPORTED_MODELS:
        raise TypeError(f"apply_hired supports {', '.join(SUPPORTED_MODELS)}; got {type(model).__name__}")
    config = HiREDConfig() if config is None else config
    if not isinstance(config, HiREDConfig):
        raise TypeError(f"config must be a HiREDConfig, got {type(config).__name__}")
    patch = HiREDPatch(model, config)  # validates before anything is changed
    handle = HiREDHandle(model, "hired")
    handle.hired = patch
    for hook in patch.recorder.install():
        handle.add_torch_hook(hook)
    handle.set_attr(patch.base, "get_image_features", _wrap(patch._orig_features, patch.get_image_features))
    handle.set_attr(model, "forward", _wrap(patch._orig_forward, patch.forward))
    handle.set_attr(model, "generate", _wrap(patch._orig_generate, patch.generate))
    return handle


def _wrap(original: Any, impl: Any) -> Any:
    """A function calling ``impl`` that carries ``original``'s name and signature (transformers
    inspects ``forward``'s parameters, e.g. to find ``mm_encoder_outputs``)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return impl(*args, **kwargs)

    return wrapper
