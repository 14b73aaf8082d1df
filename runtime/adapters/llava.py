"""LLaVA-1.5 / LLaVA-NeXT model knowledge shared by HiRED, VISTA and attention rebalancing.

Where a LLaVA instance keeps its language model, decoder layers, final norm, ``lm_head``,
vision tower and the tower's attention layers; which tower layer LLaVA reads its features
from; where the ``<image>`` placeholders are; how LLaVA-NeXT cuts an image into partitions.
Techniques ask these functions instead of walking the model themselves (transformers 5.x
layout: ``model.model.vision_tower`` / ``language_model``, ``model.lm_head``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmaccel.runtime.adapters import require_family

__all__ = [
    "MODELS",
    "VISUAL_KWARGS",
    "anyres_grid",
    "check_default_strategy",
    "decoder_layers",
    "feature_layer_index",
    "final_norm",
    "has_image",
    "image_mask",
    "image_token_id",
    "is_next",
    "layer_index",
    "lm_head",
    "pad_token_id",
    "partitions_per_image",
    "require",
    "vision_attention_layers",
    "vision_tower",
]

#: Classes this adapter covers (``runtime.adapters.FAMILIES`` maps them to ``"llava"``).
MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

#: Forward kwargs that carry the image into a LLaVA forward.
VISUAL_KWARGS = ("pixel_values", "mm_encoder_outputs", "image_sizes", "vision_feature_layer",
                 "vision_feature_select_strategy")  # fmt: skip


def require(model: object, technique: str, models: tuple[str, ...] = MODELS) -> None:
    """``TypeError`` naming the supported classes unless ``model`` is one of ``models``."""
    require_family(model, models, technique)


def is_next(model: nn.Module) -> bool:
    """Whether ``model`` is LLaVA-NeXT (anyres partitions + ``image_newline``)."""
    return type(model).__name__ == "LlavaNextForConditionalGeneration"


# -- language side ------------------------------------------------------------------------------
def decoder_layers(model: nn.Module, need: tuple[str, ...] = ()) -> nn.ModuleList:
    """The decoder layers of the language model (``model.get_decoder().layers``).

    Works for LLaVA and for Llama-style causal LMs; ``need`` names submodules every layer must
    have (e.g. ``("mlp",)``), else ``NotImplementedError``.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(x, n) for x in layers for n in need):
        wanted = "".join(f".{n}" for n in need)
        raise NotImplementedError(
            f"{type(model).__name__} has no Llama-style decoder with .layers[i]{wanted}"
        )
    return layers


def final_norm(model: nn.Module) -> nn.Module:
    """The language model's final norm (applied before ``lm_head``)."""
    norm = getattr(model.get_decoder(), "norm", None)
    if not isinstance(norm, nn.Module):
        raise NotImplementedError(f"{type(model).__name__}'s decoder has no final .norm module")
    return norm


def lm_head(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


def image_token_id(model: nn.Module) -> int | None:
    return getattr(model.config, "image_token_id", None)


def pad_token_id(model: nn.Module) -> int:
    """The generation config's pad id, else the text config's, else 0 (re-padded slots are masked)."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def image_mask(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``<image>`` placeholder positions of ``input_ids``."""
    return input_ids == model.config.image_token_id


def has_image(kwargs: Mapping[str, Any], token_id: int | None) -> bool:
    """Whether a forward's kwargs carry an image (``generate`` passes an empty ``mm_encoder_outputs``)
    and ``input_ids`` holds placeholders for it."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    visual = kwargs.get("pixel_values") is not None or any(v is not None for v in encoded.values())
    ids = kwargs.get("input_ids")
    return visual and token_id is not None and ids is not None and bool((ids == token_id).any())


# -- vision side --------------------------------------------------------------------------------
def vision_tower(model: nn.Module) -> nn.Module:
    return model.model.vision_tower


def vision_attention_layers(model: nn.Module, technique: str) -> nn.ModuleList:
    """The tower's encoder layers, checked for a [CLS] token and q/k projections.

    ``NotImplementedError`` for towers without [CLS] (SigLIP) or attention without
    ``q_proj`` / ``k_proj`` / ``num_heads`` / ``scale``.
    """
    tower = vision_tower(model)
    inner = getattr(tower, "vision_model", tower)
    if getattr(getattr(inner, "embeddings", None), "class_embedding", None) is None:
        raise NotImplementedError(
            f"{technique} ranks tokens by [CLS] attention, and the vision tower {type(tower).__name__} has no "
            "[CLS] token (e.g. SigLIP); the mean-received-attention fallback is not implemented yet"
        )
    layers = inner.encoder.layers
    for layer in layers:
        attn = layer.self_attn
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
            raise NotImplementedError(
                f"{technique} needs q_proj/k_proj attention in the tower, got {type(attn).__name__}"
            )
    return layers


def layer_index(name: str, value: int, n: int, what: str = "vision tower") -> int:
    """``value`` (negative counts from the end) as a 0-based index; ``ValueError`` naming ``name``."""
    if not -n <= value < n:
        raise ValueError(f"{name} must be in [-{n}, {n - 1}] for this {n}-layer {what}, got {value}")
    return value % n


def feature_layer_index(model: nn.Module, n: int, name: str) -> int:
    """The 0-based tower layer whose output LLaVA reads (``vision_feature_layer=-2`` -> n - 2).

    ``ValueError`` asking for ``name`` explicitly when the config holds a list or the embeddings.
    """
    feature = model.config.vision_feature_layer
    if isinstance(feature, bool) or not isinstance(feature, int):
        raise ValueError(f"vision_feature_layer is {feature!r}; pass {name}=... explicitly")
    hidden_index = feature % (n + 1)  # hidden_states[h] is the output of layer h - 1
    if hidden_index == 0:
        raise ValueError(f"vision_feature_layer selects the embeddings; pass {name}=... explicitly")
    return hidden_index - 1


def check_default_strategy(strategy: str | None, technique: str) -> None:
    if strategy != "default":
        raise NotImplementedError(
            f"{technique} supports vision_feature_select_strategy='default' ([CLS] dropped), got {strategy!r}"
        )


def partitions_per_image(model: nn.Module, image_sizes: torch.Tensor) -> list[int]:
    """LLaVA-NeXT: tower passes per image (base image + crops) for each ``(height, width)``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    return [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in image_sizes
    ]


def anyres_grid(model: nn.Module, image_size: Any) -> tuple[int, int]:
    """LLaVA-NeXT: the crop grid ``(rows, cols)`` chosen for an image of ``(height, width)``."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    size = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
    rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    return int(rows), int(cols)
