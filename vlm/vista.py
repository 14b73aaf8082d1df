"""VISTA: visual steering vector (VSV) + self-logits augmentation (SLA) against hallucination.

Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models
via Visual Information Steering" (ICML 2025).

* **VSV.** Per sample, the prompt runs once with its image (positive) and once with the image
  placeholders removed (negative); for every decoder layer ``l`` the last token's layer output
  (the residual stream, as the reference reads it) gives ``v_l = h_pos - h_neg``. During
  generation every MLP output ``x`` of layer ``l`` (all positions, prefill included, as the
  reference does) becomes
  ``||x|| * normalize(normalize(x) + lam * (1 + max(0, cos(x, -v_l))) * v_hat_l)``.
* **SLA.** ``logits = gamma * mean_{l in window} lm_head(h_l) + (1 - gamma) * logits`` with
  ``h_l`` the (un-normed, as the reference; ``sla_final_norm=True`` applies the final norm)
  outputs of decoder layers 25..30 of 32 (the reference's ``"25,30"`` indexes
  ``hidden_states[1:]``), scaled to the model's depth. The window states are
  summed by forward hooks while the normal forward runs, only at the positions whose logits
  are kept (``logits_to_keep``). Since ``lm_head`` is affine, the mix is applied to its input,
  ``lm_head(gamma * mean_l h_l + (1 - gamma) * h_final)``: no extra forward pass and no extra
  ``lm_head`` call (the reference calls ``lm_head`` once per window layer).

Steering vectors are computed automatically at the start of every new sequence that carries
an image (a forward with visual inputs and an empty cache: ``generate``'s prefill, or a plain
``model(**inputs)``), per row of the batch, so greedy, sampling, beam search and batches
work through the stock ``model.generate``. :meth:`VISTAHandle.set_steering` pins vectors
computed from inputs of your choice instead.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers.modeling_utils
from torch import nn

from mmaccel.runtime.adapters import llava
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats
from mmaccel.vlm.placeholders import padding_side_of, shrink_placeholders


def _slice_before_lm_head(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions a transformers 5.18-5.20 language model hands ``lm_head`` (the rule was inline
    there; 5.21 names it ``slice_logits_to_keep``): an int keeps the last ``logits_to_keep`` (0:
    all), a tensor indexes them."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, index, :]


slice_logits_to_keep = getattr(transformers.modeling_utils, "slice_logits_to_keep", _slice_before_lm_head)


__all__ = [
    "VISTAConfig",
    "VISTAHandle",
    "VISTAStats",
    "apply_vista",
    "compute_steering_vectors",
    "negative_inputs",
    "steer",
    "window_layers",
]

_PATCH_ATTR = "_mmaccel_vista"


@dataclass(frozen=True)
class VISTAConfig:
    """VISTA knobs.

    ``lam`` >= 0: steering strength (paper: 0.17 for CHAIR captioning, 0.10 MMHal, 0.01 POPE);
    0 turns VSV off. ``gamma`` in [0, 1]: weight of the window logits; 0 turns SLA off.
    ``window``: (start, end) fractions of depth choosing SLA's band of decoder layers; the
    default selects 0-based layers 25..30 of 32, as the reference's ``"25,30"`` over
    ``hidden_states[1:]``, and never the last layer (see :func:`window_layers`). ``layers``: an
    explicit inclusive (first, last) 0-based layer band that overrides ``window``; checked
    against the model's depth by :func:`apply_vista`. ``sla_final_norm``: apply the language
    model's final norm to the window states before ``lm_head`` (the reference does not; on a
    shallow model the un-normed residual dominates the mixed logits, see docs/steering.md).
    """

    lam: float = 0.17
    gamma: float = 0.3
    window: tuple[float, float] = (0.78125, 0.9375)
    layers: tuple[int, int] | None = None
    sla_final_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("lam", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be a finite float >= 0, got {self.lam!r}")
        if not 0.0 <= self.gamma <= 1.0:  # also rejects NaN
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        if not (isinstance(self.window, tuple) and len(self.window) == 2):
            raise TypeError(f"window must be a (start, end) tuple of floats, got {self.window!r}")
        start, end = self.window
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in self.window):
            raise TypeError(f"window must hold floats in [0, 1], got {self.window!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start <= end <= 1, got {self.window!r}")
        if self.layers is not None:
            if not (
                isinstance(self.layers, tuple)
                and len(self.layers) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
            ):
                raise TypeError(f"layers must be a (first, last) tuple of ints, got {self.layers!r}")
            if not 0 <= self.layers[0] <= self.layers[1]:
                raise ValueError(f"layers must satisfy 0 <= first <= last, got {self.layers!r}")
        if not isinstance(self.sla_final_norm, bool):
            raise TypeError(f"sla_final_norm must be a bool, got {type(self.sla_final_norm).__name__}")


def window_layers(config: VISTAConfig, depth: int) -> tuple[int, int]:
    """The inclusive 0-based (first, last) decoder layers SLA averages for a ``depth``-layer LM.

    ``config.layers`` if given (``ValueError`` when outside ``[0, depth - 1]``); otherwise
    ``round(start * depth) .. min(round(end * depth), depth - 2)`` (late but not last),
    clamped so the band holds at least one layer.
    """
    if config.layers is not None:
        first, last = config.layers
        if last >= depth:
            raise ValueError(
                f"VISTAConfig.layers {config.layers} is outside this {depth}-layer model: "
                f"use layers in [0, {depth - 1}]"
            )
        return first, last
    if depth < 2:
        raise ValueError(f"SLA needs a model with at least 2 decoder layers, got {depth}")
    start, end = config.window
    last = min(math.floor(end * depth + 0.5), depth - 2)
    first = min(math.floor(start * depth + 0.5), last)
    return first, last


def steer(x: torch.Tensor, v_hat: torch.Tensor, lam: float) -> torch.Tensor:
    """VISTA's injection: ``||x|| * normalize(normalize(x) + lam * (1 + max(0, cos(x, -v))) * v_hat)``.

    ``x`` (B, S, D); ``v_hat`` the unit steering direction, broadcastable to ``x``. Computed
    in float32, returned in ``x``'s dtype.
    """
    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    unit = xf / norm.clamp_min(1e-12)
    gate = 1.0 + (-(unit * v_hat).sum(-1, keepdim=True)).clamp_min(0.0)  # 1 + max(0, cos(x, -v))
    y = unit + (lam * gate) * v_hat
    return (y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm).to(x.dtype)


def negative_inputs(
    inputs: Mapping[str, Any], image_token_id: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The same prompts with every image placeholder removed (``input_ids`` + ``attention_mask``)."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise NotImplementedError(
            "VISTA builds the image-free prompt from input_ids; inputs_embeds is not supported"
        )
    n = int((input_ids == image_token_id).sum())
    return shrink_placeholders(
        input_ids, torch.zeros(n, dtype=torch.bool), image_token_id, pad_token_id=pad_token_id,
        attention_mask=inputs.get("attention_mask"),
    )  # fmt: skip


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` derives them from a 2-D mask (padding at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def compute_steering_vectors(
    model: nn.Module, positive: Mapping[str, Any], negative: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """Per-layer, per-sample visual steering vectors ``h_pos - h_neg`` of the decoder layers' outputs.

    ``positive``: model inputs with the image (a processor's output: ``input_ids``,
    ``attention_mask``, ``pixel_values``, ...). ``negative``: the same prompts without it;
    default :func:`negative_inputs` of ``positive``. Returns (num_layers, batch, hidden)
    float32: the last non-padding token's output of each decoder layer (the residual stream,
    as the reference reads it). On a model with VISTA applied the steering is paused while the
    two forwards run.
    """
    patch: _VISTAPatch | None = model.__dict__.get(_PATCH_ATTR)
    if negative is None:
        image_token_id = llava.image_token_id(model)
        if image_token_id is None:
            raise ValueError(f"{type(model).__name__} has no image_token_id: pass negative=... explicitly")
        negative = negative_inputs(positive, image_token_id, llava.pad_token_id(model))
    layers = llava.decoder_layers(model, ("mlp",))
    states = []
    with patch.paused() if patch is not None else contextlib.nullcontext():
        for inputs in (positive, negative):
            states.append(_last_token_layer_outputs(model, layers, dict(inputs)))
    return states[0] - states[1]


def _last_token_layer_outputs(model: nn.Module, layers: nn.ModuleList, inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, seq), got shape {tuple(mask.shape)}")
    if mask is not None and "position_ids" not in inputs:
        inputs["position_ids"] = _position_ids(mask)
    # Left padding (what generation uses) or none: the last token is the last position, also
    # after HiRED shrinks the sequence inside the forward. Right padding: index from the mask.
    right = mask is not None and padding_side_of(mask) == "right"
    last = mask.long().cumsum(1).argmax(1) if right else None
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, out: Any) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if right and out.shape[1] != mask.shape[1]:
                raise NotImplementedError("right-padded inputs whose length changes in the forward (HiRED)")
            rows = torch.arange(out.shape[0], device=out.device)
            captured[i] = (out[rows, last.to(out.device)] if right else out[:, -1]).float()

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise RuntimeError("the forward did not run every decoder layer")
    return torch.stack(captured)  # type: ignore[arg-type]


class _VISTAPatch:
    """State and hooks of VISTA on one model instance (see :func:`apply_vista`)."""

    def __init__(self, model: nn.Module, config: VISTAConfig) -> None:
        self.model = model
        self.config = config
        self.layers = llava.decoder_layers(model, ("mlp",))
        self.first, self.last = window_layers(config, len(self.layers))
        self.lm_head = llava.lm_head(model)
        if config.gamma > 0 and not isinstance(self.lm_head, nn.Linear):
            raise NotImplementedError(f"SLA needs an nn.Linear lm_head, got {type(self.lm_head).__name__}")
        self.norm = llava.final_norm(model) if config.gamma > 0 and config.sla_final_norm else None
        self.image_token_id = llava.image_token_id(model)
        self.stats = VISTAStats(self.first, self.last)
        self._signature = inspect.signature(model.forward)
        self.vectors: torch.Tensor | None = None  # (L, B, D) float32
        self.pinned = False
        self._directions: dict[int, torch.Tensor] = {}  # batch size -> (L, B', 1, D) unit vectors
        self._paused = False
        self._keep: int | torch.Tensor = 0
        self._acc: torch.Tensor | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    def set_vectors(self, vectors: torch.Tensor | None, pinned: bool) -> None:
        if vectors is not None and (vectors.ndim != 3 or vectors.shape[0] != len(self.layers)):
            raise ValueError(
                f"steering vectors must be (num_layers={len(self.layers)}, batch, hidden), "
                f"got {tuple(vectors.shape)}"
            )
        self.vectors = vectors
        self.pinned = pinned and vectors is not None
        self._directions = {}

    def directions(self, batch: int) -> torch.Tensor:
        """Unit steering directions for a batch of ``batch`` rows (beams / samples repeat rows)."""
        if self.vectors is None:
            raise RuntimeError(
                "VISTA has no visual steering vector for this forward: start the sequence with its image "
                "(pixel_values), or call handle.set_steering(...) first"
            )
        cached = self._directions.get(batch)
        if cached is None:
            n = self.vectors.shape[1]
            if batch % n:
                raise ValueError(f"steering vectors are for {n} samples, but the batch has {batch} rows")
            cached = F.normalize(self.vectors, dim=-1).repeat_interleave(batch // n, dim=1)[:, :, None]
            self._directions[batch] = cached
        return cached

    # -- hooks ---------------------------------------------------------------------------
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Start of a model forward: note ``logits_to_keep``; at a new sequence, compute the VSV."""
        if self._paused:
            return
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        self._keep = bound.get("logits_to_keep", 0)
        self._acc = None
        if self.config.lam == 0:
            return
        cache = bound.get("cache", bound.get("past_key_values"))
        if self.pinned or (cache is not None and cache.get_seq_length() > 0):
            return  # pinned vectors, or continuing a sequence: keep the vectors
        if llava.has_image(bound, self.image_token_id):
            drop = ("cache", "past_key_values", "use_cache", "logits_to_keep", "labels")
            positive = {k: v for k, v in bound.items() if k not in drop}
            self.set_vectors(compute_steering_vectors(self.model, positive), pinned=False)
            self.stats.vectors_computed += 1
        else:
            self.set_vectors(None, pinned=False)

    def steer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if self._paused:
                return None
            if index == 0:
                self.stats.steered_forwards += 1
            return steer(out, self.directions(out.shape[0])[index].to(out.device), self.config.lam)

        return hook

    def window_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if self._paused:
                return
            h = slice_logits_to_keep(out[0] if isinstance(out, tuple) else out, self._keep)
            h = (h if self.norm is None else self.norm(h)).float()
            self._acc = h if index == self.first else self._acc + h  # out of place: h is the residual

        return hook

    def lm_head_pre_hook(self, module: nn.Linear, args: tuple) -> tuple | None:
        """SLA through the head's input: ``lm_head`` is affine, so mixing the hidden states,
        ``gamma * mean_l h_l + (1 - gamma) * h``, gives the mixed logits with no extra call."""
        if self._paused:
            return None
        acc, self._acc = self._acc, None
        hidden = args[0]
        if acc is None or acc.shape != hidden.shape:
            raise RuntimeError(
                "SLA found no window hidden states for these logits: call the model itself, not lm_head alone"
            )
        gamma = self.config.gamma
        mixed = gamma / (self.last - self.first + 1) * acc + (1.0 - gamma) * hidden.float()
        self.stats.sla_mixes += 1
        return (mixed.to(hidden.dtype), *args[1:])


class VISTAStats(Stats):
    """Counts since the last :meth:`reset`: steering vectors computed (one per new sequence with
    an image), forwards steered, logits mixed by SLA; and the SLA window (0-based layers)."""

    def __init__(self, first: int | None = None, last: int | None = None) -> None:
        self.window_first, self.window_last = first, last
        self.reset()

    def reset(self) -> None:
        self.vectors_computed = 0
        self.steered_forwards = 0
        self.sla_mixes = 0

    def summary(self) -> dict[str, int | None]:
        return {
            "vectors_computed": self.vectors_computed,
            "steered_forwards": self.steered_forwards,
            "sla_mixes": self.sla_mixes,
            "window_first": self.window_first,
            "window_last": self.window_last,
        }


class VISTAHandle(PatchHandle):
    """A :class:`~mmaccel.runtime.patching.PatchHandle` with VISTA's steering controls and ``stats``."""

    vista: _VISTAPatch
    stats: VISTAStats

    def set_steering(
        self, positive: Mapping[str, Any], negative: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Compute and pin steering vectors (see :func:`compute_steering_vectors`); returns them.

        Pinned vectors steer every later forward (a batch of ``k * B`` rows repeats each of the
        ``B`` vectors ``k`` times), even ones that carry an image, until :meth:`clear_steering`.
        """
        vectors = compute_steering_vectors(self.model, positive, negative)
        self.vista.set_vectors(vectors, pinned=True)
        return vectors

    def clear_steering(self) -> None:
        """Back to automatic vectors (computed from each new sequence's own image)."""
        self.vista.set_vectors(None, pinned=False)

    @property
    def steering_vectors(self) -> torch.Tensor | None:
        """The (num_layers, batch, hidden) vectors in use, or ``None``."""
        return self.vista.vectors

    @property
    def window(self) -> tuple[int, int]:
        """SLA's inclusive (first, last) decoder layers."""
        return self.vista.first, self.vista.last


def apply_vista(model: nn.Module, config: VISTAConfig | None = None) -> VISTAHandle:
    """Install VISTA on a LLaVA-style (or Llama-style causal LM) instance; ``.remove()`` restores it.

    Forward hooks on every decoder layer's ``mlp`` (VSV injection, when ``lam > 0``) and on the
    SLA window's decoder layers, a pre-hook on ``lm_head`` (SLA, when ``gamma > 0``), and a
    pre-hook on the model that computes the VSV at each new sequence with an image. Composes with
    :func:`mmaccel.vlm.hired.apply_hired` in either order.
    """
    config = resolve_config(config, VISTAConfig)
    patch = _VISTAPatch(model, config)  # validates before anything is changed
    handle = VISTAHandle(model, "vista")
    handle.vista = patch
    handle.stats = patch.stats
    handle.set_attr(model, _PATCH_ATTR, patch)
    handle.add_torch_hook(model.register_forward_pre_hook(patch.pre_forward, with_kwargs=True))
    if config.lam > 0:
        for i, layer in enumerate(patch.layers):
            handle.add_torch_hook(layer.mlp.register_forward_hook(patch.steer_hook(i)))
    if config.gamma > 0:
        for i in range(patch.first, patch.last + 1):
            handle.add_torch_hook(patch.layers[i].register_forward_hook(patch.window_hook(i)))
        handle.add_torch_hook(patch.lm_head.register_forward_pre_hook(patch.lm_head_pre_hook))
    return handle
