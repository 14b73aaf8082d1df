"""FastV: drop the image tokens that the language model's early layers attend to least.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models" (ECCV 2024). At the prefill, the attention that the last prompt
token pays to each ``<image>`` position in decoder layer ``k - 1`` (heads averaged) ranks the
image tokens of each sequence; the top ``budget`` of them stay and the rest are dropped from
layers ``k``.. for the prefill and every decode step. Kept tokens keep their positions.

**Attention weights of one layer, without eager attention.** FastV needs one row of one layer's
attention matrix. SDPA / flash attention return no weights, and switching the whole model to
eager attention to get them costs every layer an N x N matrix. Here forward hooks on layer
``k - 1``'s ``q_proj`` / ``k_proj`` keep that layer's last-token query and its keys (the tensors
the kernel consumes), and the row ``softmax(q_last . K^T * scaling + mask)`` is computed from them
after the layer ran, with the layer's own rotary embedding: O(N) work on one layer, every layer
keeps its attention backend.

**Dropping.** ``mode="prune"`` (default, as the reference's inplace mode): a forward pre-hook on
each decoder layer ``k``.. hands it only the kept positions at the prefill (hidden states, rotary
tables, mask rows and columns; rows that keep fewer tokens are left-padded with slots that
attend only themselves), so those layers compute and cache only the kept positions; at a decode
step it picks the mask's columns of the cached positions. A forward call then returns logits for
the kept positions only (``generate`` reads the last one). ``mode="mask"`` computes every
position and masks the dropped ones out of the keys: the same outputs, nothing saved. Masks:
``None`` (SDPA without padding), bool (SDPA) or additive float (eager); other forms (flash
attention's 2-D padding mask) raise ``NotImplementedError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmaccel.runtime.adapters import llava
from mmaccel.runtime.budget import TokenBudget
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats

__all__ = ["FastVConfig", "FastVHandle", "FastVStats", "apply_fastv", "last_token_attention"]

MODES = ("prune", "mask")


@dataclass(frozen=True)
class FastVConfig:
    """FastV knobs (paper defaults: K = 2, R = 50% dropped).

    ``budget``: image tokens kept per sequence (ratio of, or count out of, its ``<image>``
    positions, LLaVA-NeXT's row newlines included, as FastV counts every image position).
    ``k`` >= 1: the first layer without the dropped tokens; layer ``k - 1``'s attention ranks them.
    ``mode``: ``"prune"`` (reference: layers ``k``.. compute only the kept positions, their KV
    cache holds only those) or ``"mask"`` (every position is computed, the dropped ones are
    masked out of the keys: the same outputs, no time saved; any batch layout).
    """

    budget: TokenBudget = field(default_factory=lambda: TokenBudget(ratio=0.5))
    k: int = 2
    mode: str = "prune"

    def __post_init__(self) -> None:
        if not isinstance(self.budget, TokenBudget):
            raise TypeError(f"budget must be a runtime.TokenBudget, got {type(self.budget).__name__}")
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k must be an int >= 1, got {self.k!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (layer k - 1 ranks the image tokens), got {self.k}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


def last_token_attention(
    q_last: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
    mask_row: torch.Tensor | None,
) -> torch.Tensor:
    """(B, N) attention of the last query to every key, heads averaged, as eager attention computes it.

    ``q_last`` (B, H, hd) and ``keys`` (B, N, Hkv, hd) before the rotary embedding; ``cos`` /
    ``sin`` (B, N, hd) of the N positions; ``mask_row`` (B, N): additive float (0 / -inf) or bool
    (True = attend), or None.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, n, kv_heads, hd = keys.shape
    heads = q_last.shape[1]
    q = q_last[:, :, None, :].float()  # (B, H, 1, hd)
    k = keys.transpose(1, 2).float()  # (B, Hkv, N, hd)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:].float(), sin[:, -1:].float())
    _, k = apply_rotary_pos_emb(k, k, cos.float(), sin.float())
    k = k.repeat_interleave(heads // kv_heads, dim=1, output_size=heads)  # GQA, as repeat_kv
    logits = (q @ k.transpose(-1, -2)).squeeze(2) * scaling  # (B, H, N)
    if mask_row is not None:
        if mask_row.dtype == torch.bool:
            logits = logits.masked_fill(~mask_row[:, None, :], float("-inf"))
        else:
            logits = logits + mask_row[:, None, :].float()
    return logits.softmax(-1).mean(1)


class FastVStats(Stats):
    """Prefills ranked and image positions before / after FastV since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefills = 0
        self.sequences = 0
        self.image_tokens_before = 0
        self.image_tokens_after = 0

    def summary(self) -> dict[str, int | float | None]:
        before = self.image_tokens_before
        return {
            "prefills": self.prefills,
            "sequences": self.sequences,
            "image_tokens_before": before,
            "image_tokens_after": self.image_tokens_after,
            "kept_ratio": self.image_tokens_after / before if before else None,
        }


class FastVPatch:
    """The hooks FastV installs on one LLaVA instance (see :func:`apply_fastv`)."""

    def __init__(self, model: nn.Module, config: FastVConfig) -> None:
        self.model, self.config = model, config
        self.layers = llava.decoder_layers(model, ("self_attn",))
        if not 1 <= config.k < len(self.layers):
            raise ValueError(f"k must be in [1, {len(self.layers) - 1}] for this {len(self.layers)}-layer model, got {config.k}")
        attn = self.layers[config.k - 1].self_attn
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "head_dim", "scaling")):
            raise NotImplementedError(f"FastV needs Llama-style attention (q_proj, k_proj, head_dim, scaling), got {type(attn).__name__}")
        self.image_token_id = llava.image_token_id(model)
        self.stats = FastVStats()
        self.input_ids: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None  # (B, prompt_len) bool, set by the prefill
        self.kept_index: torch.Tensor | None = None  # (B, L') prompt positions layers k.. hold ("prune")
        self.kept_valid: torch.Tensor | None = None  # (B, L') False on the slots padding short rows
        self._qk: dict[str, torch.Tensor] = {}

    def hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        attn = self.layers[self.config.k - 1].self_attn
        handles = [
            self.model.register_forward_pre_hook(self._start, with_kwargs=True),
            attn.q_proj.register_forward_hook(self._keep("q")),
            attn.k_proj.register_forward_hook(self._keep("k")),
            attn.register_forward_hook(self._rank, with_kwargs=True),
        ]
        late = self.layers[self.config.k :]
        if self.config.mode == "mask":
            handles += [layer.self_attn.register_forward_pre_hook(self._mask, with_kwargs=True) for layer in late]
        else:
            handles += [layer.register_forward_pre_hook(self._prune, with_kwargs=True) for layer in late]
        return handles

    def _start(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:  # a new prompt: rank it in layer k - 1
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise NotImplementedError("FastV needs input_ids to find the <image> positions")
            self.input_ids, self.dropped = ids, None
            self.kept_index = self.kept_valid = None

    def _keep(self, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.dropped is None and self.input_ids is not None:
                self._qk[kind] = output[:, -1] if kind == "q" else output

        return hook

    def _rank(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self.dropped is not None or self.input_ids is None or "k" not in self._qk:
            return
        q, k = self._qk.pop("q"), self._qk.pop("k")
        b, n = k.shape[:2]
        hd = module.head_dim
        cos, sin = kwargs["position_embeddings"]
        row = last_token_attention(q.view(b, -1, hd), k.view(b, n, -1, hd), cos, sin, module.scaling,
                                   _last_row(kwargs.get("attention_mask"), n))  # fmt: skip
        is_image = self.input_ids == self.image_token_id
        counts = is_image.sum(1).tolist()  # the one host read: how many image tokens each prompt has
        keep = [self.config.budget.resolve(c) if c else 0 for c in counts]
        scores = row.masked_fill(~is_image, float("-inf"))
        order = scores.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
        kept = rank < torch.tensor(keep, device=rank.device)[:, None]
        self.dropped = is_image & ~kept
        if self.config.mode == "prune":  # the kept positions of each row, right-aligned
            width = n - min(c - k for c, k in zip(counts, keep))
            order = (~self.dropped).to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
            lengths = (~self.dropped).sum(1, keepdim=True)
            slot = torch.arange(width, device=order.device)[None] - (width - lengths)  # < 0: padding slot
            self.kept_valid = slot >= 0
            self.kept_index = order.gather(1, slot.clamp_min(0))
        self.stats.prefills += 1
        self.stats.sequences += b
        self.stats.image_tokens_before += sum(counts)
        self.stats.image_tokens_after += sum(keep)

    def _mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.dropped is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q_len = hidden.shape[1]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
        keys = past + q_len
        drop = torch.zeros((self.dropped.shape[0], keys), dtype=torch.bool, device=hidden.device)
        drop[:, : self.dropped.shape[1]] = self.dropped
        if mask is None:  # SDPA's causal fast path: build the causal mask it stood for
            q_pos = torch.arange(past, keys, device=hidden.device)
            causal = torch.arange(keys, device=hidden.device)[None, :] <= q_pos[:, None]
            mask = causal[None, None] & ~drop[:, None, None, :]
        elif mask.ndim == 4 and mask.dtype == torch.bool:
            mask = mask & ~drop[:, None, None, : mask.shape[-1]]
        elif mask.ndim == 4 and mask.is_floating_point():
            mask = mask.masked_fill(drop[:, None, None, : mask.shape[-1]], torch.finfo(mask.dtype).min)
        else:
            raise NotImplementedError(
                f"FastV masks 4-D bool / float attention masks (SDPA, eager); got a {mask.ndim}-D {mask.dtype} "
                f"mask ({self.model.config._attn_implementation}: flash attention is not supported yet)"
            )
        kwargs["attention_mask"] = mask
        return args, kwargs


    def _prune(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Decoder layers k..: at the prefill, keep the kept positions only (hidden states of layer k,
        rotary tables, mask rows and columns); at a decode step, the mask's columns of the cached
        positions. Short rows are left-padded with slots that attend only themselves."""
        if self.kept_index is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        index, valid = self.kept_index, self.kept_valid
        b, width = index.shape
        prompt = self.dropped.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and not (mask.ndim == 4 and (mask.dtype == torch.bool or mask.is_floating_point())):
            raise NotImplementedError(
                f"FastV prunes with 4-D bool / float attention masks (SDPA, eager); got a {mask.ndim}-D {mask.dtype} "
                f"mask ({self.model.config._attn_implementation}: flash attention is not supported yet)"
            )
        rows = torch.arange(b, device=hidden.device)[:, None]
        q_len = hidden.shape[1]
        if q_len == prompt:  # the prefill reaching layer k: gather the kept positions
            hidden = hidden[rows, index]
        if hidden.shape[1] == width:  # prefill, layers k..
            cos, sin = (t.expand(b, *t.shape[1:]) for t in kwargs["position_embeddings"])
            kwargs["position_embeddings"] = (cos[rows, index], sin[rows, index])
            cols = index
            q_rows = index
        else:  # decode: queries are the new positions, keys the kept prompt + everything after it
            cols = torch.cat([index, torch.arange(prompt, prompt + _past_after(kwargs, module, width, hidden),
                                                  device=index.device).expand(b, -1)], 1)  # fmt: skip
            q_rows = None
        col_valid = torch.cat([valid, torch.ones((b, cols.shape[1] - width), dtype=torch.bool, device=valid.device)], 1)
        if mask is None:  # SDPA's causal fast path: build the mask it stood for
            allowed = col_valid[:, None, None, :]
            if q_rows is not None:
                allowed = allowed & (cols[:, None, :] <= q_rows[:, :, None])[:, None]
        else:
            mask = mask.expand(b, *mask.shape[1:])
            if q_rows is not None:  # prefill: the kept rows and columns
                allowed = mask[rows[:, :, None], 0, q_rows[:, :, None], cols[:, None, :]][:, None]
            else:  # decode: the kept columns
                allowed = mask.gather(3, cols[:, None, None, :].expand(b, mask.shape[1], mask.shape[2], -1))
            if allowed.dtype == torch.bool:
                allowed = allowed & col_valid[:, None, None, :]
            else:
                allowed = allowed.masked_fill(~col_valid[:, None, None, :], torch.finfo(allowed.dtype).min)
        if q_rows is not None:  # a padding slot attends itself only: finite values, never read
            eye = torch.eye(width, dtype=torch.bool, device=hidden.device)[None, None] & ~valid[:, None, :, None]
            allowed = allowed | eye if allowed.dtype == torch.bool else allowed.masked_fill(eye, 0.0)
        kwargs["attention_mask"] = allowed
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


def _past_after(kwargs: dict[str, Any], module: nn.Module, width: int, hidden: torch.Tensor) -> int:
    """Decode: positions after the prompt, this step's included (the layer's cache holds ``width``
    prompt slots and the earlier steps)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else width
    return past - width + hidden.shape[1]


def _last_row(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The last query's row of a 4-D attention mask (None stays None: no padding, causal)."""
    if mask is None:
        return None
    if mask.ndim == 4:
        return mask[:, 0, -1, :n]
    raise NotImplementedError(f"FastV reads 4-D attention masks, got shape {tuple(mask.shape)}")


class FastVHandle(PatchHandle):
    """A :class:`~mmaccel.runtime.patching.PatchHandle` with ``stats`` and the last prompt's ``dropped``."""

    fastv: FastVPatch
    stats: FastVStats

    @property
    def dropped(self) -> torch.Tensor | None:
        """(B, prompt_len) bool: the ``<image>`` positions the last prefill dropped."""
        return self.fastv.dropped


def apply_fastv(model: nn.Module, config: FastVConfig | None = None) -> FastVHandle:
    """Install FastV on a LLaVA-1.5 / LLaVA-NeXT instance; ``handle.remove()`` restores it.

    Hooks only: the model's forward pre-hook (notes each new prompt's ``input_ids``), layer
    ``k - 1``'s ``q_proj`` / ``k_proj`` / attention (rank the image tokens at the prefill) and the
    attention of layers ``k``.. (mask the dropped positions). Works with ``generate`` and a KV
    cache, batched, with SDPA or eager attention.
    """
    llava.require(model, "apply_fastv")
    config = resolve_config(config, FastVConfig)
    patch = FastVPatch(model, config)  # validates before anything is changed
    handle = FastVHandle(model, "fastv")
    handle.fastv = patch
    handle.stats = patch.stats
    for hook in patch.hooks():
        handle.add_torch_hook(hook)
    return handle
