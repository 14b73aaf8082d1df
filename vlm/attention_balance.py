"""Attention rebalancing against hallucination: dual-stream visual tokens + head-specific boosts.

Arif et al., "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model" (PAINT, 2025).

* **Dual-stream token selection** from the vision tower's [CLS] attention (computed from the
  layers' q/k projections, :mod:`mmaccel.vlm.cls_attention`): "local" tokens are the top
  ``local_ratio`` of an image's tokens by early-layer attention, minus the "summary" tokens,
  the IQR outliers (``> Q3 + iqr_factor * IQR``) of late-layer attention.
* **Head-specific modulation**: in LLM layers ``start_layer..L-1`` the pre-softmax logits
  ``a`` of the current query row (the last prompt token at prefill, the new token while
  decoding) become ``a + s_h * (alpha * |a| * local + beta * |a| * summary)``, where ``s_h``
  is the head's visual sensitivity, its attention mass on the image tokens at the last prompt
  token, divided by the layer's largest, when ``head_modulation=True`` (the paper); the
  default ``head_modulation=False`` uses ``s_h = 1`` for every head, as the released code does.

The modulation runs inside a registered transformers attention function
(``AttentionInterface``, name :data:`ATTENTION_NAME`): the other rows go through SDPA, only
the current query's row is recomputed, so decoding costs one row per layer, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mmaccel.runtime.adapters import llava
from mmaccel.runtime.budget import TokenBudget
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats
from mmaccel.vlm.cls_attention import ClsAttentionRecorder

__all__ = [
    "ATTENTION_NAME",
    "AttentionBalanceConfig",
    "AttentionBalanceHandle",
    "AttentionBalanceStats",
    "TokenStreams",
    "apply_attention_balance",
    "balanced_row",
    "select_streams",
]

ATTENTION_NAME = "mmaccel_attention_balance"
#: LLaVA-NeXT is refused: generate drops ``image_sizes`` before the prefill (see ``_BalancePatch``).
MODELS = ("LlavaForConditionalGeneration",)
_STATE_ATTR = "_mmaccel_attention_balance"


@dataclass(frozen=True)
class AttentionBalanceConfig:
    """Rebalancing knobs (defaults: the paper's).

    ``alpha`` / ``beta`` >= 0: boosts toward local / summary tokens (0.7 / 0.3).
    ``local_ratio`` in (0, 1]: share of an image's tokens that are local candidates (0.25).
    ``iqr_factor`` >= 0: summary tokens are late-layer outliers above ``Q3 + iqr_factor * IQR``.
    ``early_layer`` / ``late_layer``: vision-tower layers ranking local / summary tokens
    (``late_layer=None``: the layer whose output LLaVA uses, the penultimate for CLIP-L).
    ``start_layer``: first LLM layer (0-based) modulated; all later layers are too.
    ``head_modulation``: scale each head by its visual sensitivity (paper) or not (default:
    the released code applies every head alike).
    """

    alpha: float = 0.7
    beta: float = 0.3
    local_ratio: float = 0.25
    iqr_factor: float = 1.5
    early_layer: int = 0
    late_layer: int | None = None
    start_layer: int = 2
    head_modulation: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "local_ratio", "iqr_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        if not 0.0 < self.local_ratio <= 1.0:
            raise ValueError(f"local_ratio must be in (0, 1], got {self.local_ratio!r}")
        for name in ("early_layer", "late_layer", "start_layer"):
            value = getattr(self, name)
            if value is None and name == "late_layer":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int layer index, got {value!r}")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")
        if not isinstance(self.head_modulation, bool):
            raise TypeError(f"head_modulation must be a bool, got {type(self.head_modulation).__name__}")


@dataclass(frozen=True)
class TokenStreams:
    """One image's dual-stream selection over its visual tokens (LLM order)."""

    local: torch.Tensor  # (N,) bool
    summary: torch.Tensor  # (N,) bool


def select_streams(
    early: torch.Tensor, late: torch.Tensor, local_ratio: float, iqr_factor: float
) -> TokenStreams:
    """Local = top ``local_ratio`` by ``early`` minus summary; summary = IQR outliers of ``late``."""
    if early.shape != late.shape or early.ndim != 1:
        raise ValueError(
            f"early and late must be equal 1-D score vectors, got {tuple(early.shape)}, {tuple(late.shape)}"
        )
    late = late.double()
    q1, q3 = torch.quantile(late, torch.tensor([0.25, 0.75], dtype=late.dtype, device=late.device))
    summary = late > q3 + iqr_factor * (q3 - q1)
    k = TokenBudget(ratio=local_ratio).resolve(early.numel())
    local = torch.zeros_like(summary)
    local[torch.topk(early.double(), k, sorted=False).indices] = True
    return TokenStreams(local & ~summary, summary)


def balanced_row(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask_row: torch.Tensor | None,
    scaling: float,
    boost: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query row with pre-softmax boosts ``a + boost * |a|``.

    ``query`` (B, H, hd), ``key`` / ``value`` (B, Hkv, T, hd) (grouped-query: H = g * Hkv),
    ``mask_row`` (B, 1|H, T) bool (True = attend) or float (additive) or ``None``, ``boost``
    (B, H, T) or ``None``. Returns the output (B, H, hd) and the probabilities it used
    (B, H, T), float32.
    """
    b, h, hd = query.shape
    hkv, t = key.shape[1], key.shape[2]
    q = query.reshape(b, hkv, h // hkv, hd)
    logits = (q @ key.transpose(-1, -2)).float().reshape(b, h, t) * scaling
    if boost is not None:
        logits = torch.addcmul(logits, boost, logits.abs())
    if mask_row is not None:
        if mask_row.dtype == torch.bool:
            logits = logits.masked_fill(~mask_row, float("-inf"))
        else:
            logits = logits + mask_row.float()
    probs = logits.softmax(-1)
    out = probs.to(value.dtype).reshape(b, hkv, h // hkv, t) @ value
    return out.reshape(b, h, hd), probs


@dataclass
class _Sequence:
    """What one prompt (batch) needs: its image positions, boosts, and heads' sensitivities."""

    input_ids: torch.Tensor | None
    weights: torch.Tensor | None = None  # (B, S) alpha * local + beta * summary
    is_image: torch.Tensor | None = None  # (B, S) bool
    streams: list[TokenStreams] = field(default_factory=list)
    sensitivity: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H)
    _padded: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None

    def padded(self, batch: int, keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``weights`` / ``is_image`` for ``batch`` rows (repeated per beam) over ``keys`` keys
        (generated keys get no boost); built once per decoding step, shared by the layers."""
        if self._padded is None or self._padded[0] != (batch, keys):
            reps = batch // self.weights.shape[0]
            pad = (0, keys - self.weights.shape[1])
            weights = F.pad(self.weights.to(device).repeat_interleave(reps, 0), pad)
            is_image = F.pad(self.is_image.to(device).repeat_interleave(reps, 0), pad)
            self._padded = ((batch, keys), weights, is_image)
        return self._padded[1], self._padded[2]


class _BalancePatch:
    """State and hooks of attention rebalancing on one LLaVA instance."""

    def __init__(self, model: nn.Module, config: AttentionBalanceConfig) -> None:
        if llava.is_next(model):
            raise NotImplementedError(
                "attention rebalancing on LLaVA-NeXT is not implemented yet: generate drops image_sizes "
                "before the prefill, so the anyres token layout cannot be mapped back to the tower's scores"
            )
        llava.require(model, "apply_attention_balance", MODELS)
        self.model = model
        self.config = config
        self.text_config = model.get_decoder().config
        impl = self.text_config._attn_implementation
        if impl != "sdpa":
            raise NotImplementedError(
                f"attention rebalancing wraps the 'sdpa' attention; this model uses {impl!r} "
                "(load it with attn_implementation='sdpa')"
            )
        tower_layers = llava.vision_attention_layers(model, "attention rebalancing (token streams)")
        n = len(tower_layers)
        late = config.late_layer
        if late is None:
            late = llava.feature_layer_index(model, n, "AttentionBalanceConfig.late_layer")
        self.early = llava.layer_index("early_layer", config.early_layer, n)
        self.late = llava.layer_index("late_layer", late, n)
        self.layers = llava.decoder_layers(model, ("self_attn",))
        llava.layer_index("start_layer", config.start_layer, len(self.layers), "LLM")
        self.recorder = ClsAttentionRecorder(
            [layer.self_attn for layer in tower_layers], [self.early, self.late]
        )
        self.image_token_id = llava.image_token_id(model)
        self.stats = AttentionBalanceStats()
        self.current: _Sequence | None = None
        self.tower_scores: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stack: list[_Sequence | None] = []

    # -- hooks ---------------------------------------------------------------------------
    def tower_pre(self, module: nn.Module, args: tuple) -> None:
        self.recorder.reset()
        self.recorder.active = True

    def tower_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Keep the [CLS] rows of the tower run (generate encodes images before the prefill)."""
        self.recorder.active = False
        scores = self.recorder.scores
        if self.early in scores and self.late in scores:
            self.tower_scores = (scores[self.early][:, 1:], scores[self.late][:, 1:])  # drop [CLS]
        self.recorder.reset()

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """A new sequence (empty cache) starts a fresh state; nested forwards get their own."""
        self._stack.append(self.current)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoded = kwargs.get("mm_encoder_outputs") or {}  # generate passes {} for text-only prompts
        visual = kwargs.get("pixel_values") is not None or any(v is not None for v in encoded.values())
        if visual and input_ids is None:
            raise NotImplementedError(
                "attention rebalancing locates image tokens in input_ids; inputs_embeds is not supported"
            )
        self.current = _Sequence(input_ids if visual else None)
        self.stats.prompts += 1

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        outer = self._stack.pop()
        if self._stack:  # nested forward (e.g. VISTA's steering runs): back to the outer prompt
            self.current = outer

    # -- selection -----------------------------------------------------------------------
    def _prepare(self, seq: _Sequence) -> None:
        """Map the last tower run's [CLS] rows onto the prompt's image positions."""
        if self.tower_scores is None:
            raise RuntimeError("the vision tower's [CLS] attention was not recorded for this prompt")
        early, late = self.tower_scores
        ids = seq.input_ids
        is_image = llava.image_mask(self.model, ids)
        n_images, scored = early.shape
        keeps = self._hired_keeps(n_images, scored)
        n = scored if keeps is None else int(keeps[0].sum())  # image positions per image in input_ids
        per_row = is_image.sum(1)
        copies = int(per_row.sum()) // (n_images * n) if n_images * n else 0
        if copies < 1 or int(per_row.sum()) != copies * n_images * n or bool((per_row % n).any()):
            raise NotImplementedError(
                f"{int(per_row.sum())} image positions in input_ids do not match {n_images} images x {n} "
                "tokens (only vision_feature_select_strategy='default' layouts are supported; with HiRED, "
                "only generate() and forward calls that HiRED has already shortened)"
            )
        # generate repeats rows (beams / num_return_sequences) after encoding each image once.
        images = (per_row // n).tolist()
        starts = [0]
        for count in images[::copies]:
            starts.append(starts[-1] + count)
        order = [starts[r // copies] + j for r in range(len(images)) for j in range(images[r])]
        cfg = self.config
        seq.streams = [select_streams(e, s, cfg.local_ratio, cfg.iqr_factor) for e, s in zip(early, late)]
        if keeps is not None:  # streams are chosen over the whole image; HiRED's kept tokens get theirs
            kept = [TokenStreams(x.local[k.to(x.local.device)], x.summary[k.to(x.local.device)])
                    for x, k in zip(seq.streams, keeps)]  # fmt: skip
        else:
            kept = seq.streams
        local = torch.cat([kept[i].local for i in order]).to(ids.device)
        summary = torch.cat([kept[i].summary for i in order]).to(ids.device)
        weights = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        weights[is_image] = cfg.alpha * local.float() + cfg.beta * summary.float()
        seq.weights, seq.is_image = weights, is_image
        self.stats.images += len(seq.streams)
        self.stats.local_tokens += sum(int(x.local.sum()) for x in seq.streams)
        self.stats.summary_tokens += sum(int(x.summary.sum()) for x in seq.streams)

    def _hired_keeps(self, n_images: int, scored: int) -> list[torch.Tensor] | None:
        """Per image, HiRED's keep mask over the tower's tokens (None without HiRED). Its last
        selections and our tower scores come from the same encode."""
        from mmaccel.vlm.hired import PATCH_ATTR

        hired = self.model.__dict__.get(PATCH_ATTR)
        if hired is None:
            return None
        keeps = [s.keep for s in hired.last_selections]
        if len(keeps) != n_images or any(k.numel() != scored for k in keeps):
            raise NotImplementedError(
                f"HiRED's selections ({[k.numel() for k in keeps]}) do not match the {n_images} scored images "
                f"of {scored} tokens"
            )
        if len({int(k.sum()) for k in keeps}) > 1:
            raise NotImplementedError("attention rebalancing with HiRED needs the same kept count for every image")
        return keeps

    # -- attention -----------------------------------------------------------------------
    def attention(
        self, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:  # fmt: skip
        seq = self.current
        cfg = self.config
        active = (
            layer >= cfg.start_layer
            and seq is not None
            and seq.input_ids is not None
            and (cfg.alpha or cfg.beta)
        )
        if not active:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        if seq.weights is None:
            self._prepare(seq)
        b, _, s, hd = query.shape
        t = key.shape[2]
        scaling = hd**-0.5 if scaling is None else scaling
        if s > 1:
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        else:
            out = None
        rows = seq.weights.shape[0]
        if b % rows:
            raise ValueError(f"rebalancing state is for {rows} samples, but the batch has {b} rows")
        weights, is_image = seq.padded(b, t, query.device)
        sens = seq.sensitivity.get(layer)
        mask_row = None if attention_mask is None else attention_mask[:, :, -1, :]
        if sens is None:  # prefill: measure this layer's heads at the last prompt token
            _, probs = balanced_row(query[:, :, -1], key, value, mask_row, scaling, None)
            mass = (probs * is_image[:, None, :]).sum(-1)  # (B, H)
            sens = (
                mass / mass.amax(-1, keepdim=True).clamp_min(1e-12)
                if cfg.head_modulation
                else torch.ones_like(mass)
            )
            seq.sensitivity[layer] = sens
        row, _ = balanced_row(
            query[:, :, -1], key, value, mask_row, scaling, sens[:, :, None] * weights[:, None, :]
        )
        self.stats.modulated_rows += b
        if out is None:
            return row[:, None].to(query.dtype), None  # (B, 1, H, hd)
        out[:, -1] = row.to(out.dtype)
        return out, None


def _balanced_attention(
    module: nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """The registered attention function: rebalanced for patched layers, plain SDPA otherwise."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        return sdpa_attention_forward(module, query, *args, **kwargs)
    patch, layer = state
    return patch.attention(layer, module, query, *args, **kwargs)


def _register() -> None:
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _balanced_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class AttentionBalanceStats(Stats):
    """Counts since the last :meth:`reset`: prompts started, images whose streams were selected,
    their local / summary tokens, and query rows rebalanced (batch rows x layers x steps)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prompts = 0
        self.images = 0
        self.local_tokens = 0
        self.summary_tokens = 0
        self.modulated_rows = 0

    def summary(self) -> dict[str, int | float | None]:
        return {
            "prompts": self.prompts,
            "images": self.images,
            "local_tokens": self.local_tokens,
            "summary_tokens": self.summary_tokens,
            "local_tokens_per_image": self.local_tokens / self.images if self.images else None,
            "summary_tokens_per_image": self.summary_tokens / self.images if self.images else None,
            "modulated_rows": self.modulated_rows,
        }


class AttentionBalanceHandle(PatchHandle):
    """A :class:`~mmaccel.runtime.patching.PatchHandle` exposing the last prompt's streams, head
    weights and ``stats``."""

    balance: _BalancePatch
    stats: AttentionBalanceStats

    @property
    def last_streams(self) -> list[TokenStreams]:
        """Per image of the last prompt, its local / summary token masks (LLM order)."""
        seq = self.balance.current
        return [] if seq is None else seq.streams

    @property
    def last_sensitivity(self) -> dict[int, torch.Tensor]:
        """Per modulated LLM layer, the (batch, heads) head scales of the last prompt."""
        seq = self.balance.current
        return {} if seq is None else dict(seq.sensitivity)


def apply_attention_balance(
    model: nn.Module, config: AttentionBalanceConfig | None = None
) -> AttentionBalanceHandle:
    """Install attention rebalancing on a LLaVA-1.5 instance; ``.remove()`` restores it.

    Registers :data:`ATTENTION_NAME` in transformers' ``AttentionInterface`` (once per
    process), points this instance's language-model config at it, tags each LLM attention
    module with its layer, hooks the vision tower's q/k projections of the two scoring layers
    and the model's forward (to start a fresh state at each new prompt).
    """
    config = resolve_config(config, AttentionBalanceConfig)
    if "attention_balance" in model.__dict__.get("_mmaccel_patches", ()):
        # before validation: the patched model's attention is ours, not 'sdpa'
        raise ValueError(
            f"attention_balance is already applied to this {type(model).__name__}; "
            "call .remove() on its handle first"
        )
    patch = _BalancePatch(model, config)  # validates before anything is changed
    _register()
    handle = AttentionBalanceHandle(model, "attention_balance")
    handle.balance = patch
    handle.stats = patch.stats
    for hook in patch.recorder.install():
        handle.add_torch_hook(hook)
    tower = llava.vision_tower(model)
    handle.add_torch_hook(tower.register_forward_pre_hook(patch.tower_pre))
    handle.add_torch_hook(tower.register_forward_hook(patch.tower_post, always_call=True))
    handle.add_torch_hook(model.register_forward_pre_hook(patch.pre_forward, with_kwargs=True))
    handle.add_torch_hook(model.register_forward_hook(patch.post_forward, with_kwargs=True, always_call=True))
    for i, layer in enumerate(patch.layers):
        handle.set_attr(layer.self_attn, _STATE_ATTR, (patch, i))
    handle.set_attr(patch.text_config, "_attn_implementation_internal", ATTENTION_NAME)
    return handle
