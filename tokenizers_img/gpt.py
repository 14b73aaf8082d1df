"""LlamaGen-style image-token GPT with the NAR column head and a static KV cache.

Architecture as LlamaGen's ``Transformer`` (Sun et al., "Autoregressive Model Beats Diffusion:
Llama for Scalable Image Generation", 2024): RMSNorm, SwiGLU, no biases, 2-D RoPE (the first
half of the rotary pairs encode the row, the second half the column; condition tokens get zero
rotary entries, a LlamaGen quirk kept so their weights load), one class token (``c2i``, with a
null class for classifier-free guidance) or projected caption tokens (``t2i``).

NAR (He et al., "Neighboring Autoregressive Modeling for Efficient Visual Generation", 2025)
adds a *column head*: ``column_blocks`` extra transformer blocks after the trunk plus their own
norm and output. The row head (``norm`` + ``output``) predicts a token's right neighbour, the
column head the neighbour below. State-dict names follow LlamaGen / NAR exactly
(``layers.{n_layer}`` is the first column block, ``medusa_norm`` / ``medusa_output`` its head),
so their checkpoints load with :meth:`GPT.from_checkpoint`.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "KVCache", "rope_2d", "GPT_PRESETS"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

GPT_PRESETS: dict[str, dict[str, int]] = {
    "B": {"n_layer": 12, "n_head": 12, "dim": 768},
    "L": {"n_layer": 24, "n_head": 16, "dim": 1024},
    "XL": {"n_layer": 36, "n_head": 20, "dim": 1280},
}

# Keys LlamaGen/NAR training code may leave in a checkpoint that hold no weights.
_RUNTIME_KEYS = ("freqs_cis", "causal_mask", "diagonal_mask")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _positive_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`; defaults are LlamaGen GPT-B class-conditional with the NAR head.

    ``column_blocks`` is 1 for NAR checkpoints and 0 for plain LlamaGen ones (raster only).
    ``cls_token_num`` is 1 for ``c2i``; for ``t2i`` it is the caption length (LlamaGen: 120).
    """

    vocab_size: int = 16384
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    model_type: str = "c2i"
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    caption_dim: int = 2048
    cls_token_num: int = 1
    column_blocks: int = 1

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "n_layer",
            "n_head",
            "multiple_of",
            "num_classes",
            "caption_dim",
            "cls_token_num",
        ):
            _positive_int(name, getattr(self, name))
        _positive_int("column_blocks", self.column_blocks, low=0)
        if self.n_kv_head is not None:
            _positive_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(
                f"dim / n_head must be an integer divisible by 4 (2-D RoPE), got dim={self.dim}, n_head={self.n_head}"
            )
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError(f"cls_token_num must be 1 for model_type='c2i', got {self.cls_token_num}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")
        for name in ("rope_base", "norm_eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")

    @classmethod
    def preset(cls, size: str, **overrides: object) -> GPTConfig:
        """LlamaGen size ``'B'`` (111M), ``'L'`` (343M) or ``'XL'`` (775M), with overrides."""
        if size not in GPT_PRESETS:
            raise ValueError(f"size must be one of {sorted(GPT_PRESETS)}, got {size!r}")
        return cls(**{**GPT_PRESETS[size], **overrides})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> GPTConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return math.ceil(hidden / self.multiple_of) * self.multiple_of

    @property
    def has_null_condition(self) -> bool:
        """Whether the model has an unconditional input (needed for CFG)."""
        return self.model_type == "t2i" or self.class_dropout_prob > 0


def rope_2d(height: int, width: int, head_dim: int, base: float, n_cond: int) -> torch.Tensor:
    """Rotary table ``[n_cond + height * width, head_dim // 2, 2]`` (cos, sin) in raster order.

    Pairs ``[0, head_dim/4)`` rotate by the row index, the rest by the column index; the
    ``n_cond`` condition rows are zero (LlamaGen's convention, non-square grids allowed).
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    rows = torch.outer(torch.arange(height).float(), freqs)
    cols = torch.outer(torch.arange(width).float(), freqs)
    grid = torch.cat(
        [rows[:, None, :].expand(-1, width, -1), cols[None, :, :].expand(height, -1, -1)], dim=-1
    ).flatten(0, 1)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)
    return torch.cat([torch.zeros(n_cond, half, 2), table])


def _apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, S, heads, D]`` by ``rope [S, D/2, 2]``."""
    xs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Static preallocated keys/values for every block, written at absolute sequence positions."""

    def __init__(
        self, config: GPTConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (config.n_layer + config.column_blocks, batch, config.kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, heads, S, D]`` at ``positions [S]``; return the first ``kv_len`` entries."""
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer, :, :, :kv_len], self.values[layer, :, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor,
        cache: tuple[KVCache, int, torch.Tensor, int] | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = _apply_rope(q.view(b, s, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = _apply_rope(k.view(b, s, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            store, layer, positions, kv_len = cache
            k, v = store.update(layer, positions, k, v, kv_len)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, cache: tuple | None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class labels -> one condition token; row ``num_classes`` is the null class (CFG)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(
            config.num_classes + int(config.class_dropout_prob > 0), config.dim
        )

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.caption_dim, config.dim, bias=False)
        self.fc2 = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features ``[B, T, caption_dim]`` -> T condition tokens; ``uncond_embedding`` is the null caption."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.cap_proj = CaptionMLP(config)
        self.register_buffer(
            "uncond_embedding",
            torch.randn(config.cls_token_num, config.caption_dim) / config.caption_dim**0.5,
        )

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)


class GPT(nn.Module):
    """Image-token transformer; call :meth:`hidden` then :meth:`row_logits` / :meth:`column_logits`.

    Sequences are ``[condition tokens, image tokens in raster order]``; ``positions`` are
    absolute indices into that sequence (image token ``r`` sits at ``cls_token_num + r``).
    """

    def __init__(self, config: GPTConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config) if config.model_type == "c2i" else CaptionEmbedder(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(config) for _ in range(config.n_layer + config.column_blocks)
        )
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.column_blocks:
            self.medusa_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
            self.medusa_output = nn.Linear(config.dim, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
        self._rope: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    # -- inputs ----------------------------------------------------------------------------
    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Class labels ``[B]`` (``c2i``) or caption features ``[B, T, caption_dim]`` (``t2i``) -> ``[B, T, dim]``."""
        cfg = self.config
        if cfg.model_type == "c2i":
            if cond.ndim != 1 or cond.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"c2i condition must be integer class labels of shape [B], got {tuple(cond.shape)} {cond.dtype}"
                )
            top = cfg.num_classes + int(cfg.class_dropout_prob > 0)
            if cond.numel() and (cond.min() < 0 or cond.max() >= top):
                raise ValueError(
                    f"class labels must be in [0, {top}), got range [{int(cond.min())}, {int(cond.max())}]"
                )
        elif (
            cond.ndim != 3
            or cond.shape[1:] != (cfg.cls_token_num, cfg.caption_dim)
            or not cond.is_floating_point()
        ):
            raise ValueError(
                f"t2i condition must be float caption features [B, {cfg.cls_token_num}, {cfg.caption_dim}], got {tuple(cond.shape)}"
            )
        return self.cls_embedding(cond.to(self.output.weight.dtype) if cond.is_floating_point() else cond)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The unconditional input for CFG: the null class, or LlamaGen's learned null caption."""
        if not self.config.has_null_condition:
            raise ValueError("this model has no null class (class_dropout_prob=0), so cfg_scale must be 1.0")
        device = self.output.weight.device
        if self.config.model_type == "c2i":
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        return self.cls_embedding.uncond_embedding.expand(batch, -1, -1)

    def rope(self, height: int, width: int) -> torch.Tensor:
        """Cached :func:`rope_2d` table for an ``height x width`` grid on the model's device."""
        device = self.output.weight.device
        key = (height, width, device)
        if key not in self._rope:
            cfg = self.config
            self._rope[key] = rope_2d(height, width, cfg.head_dim, cfg.rope_base, cfg.cls_token_num).to(
                device
            )
        return self._rope[key]

    def new_cache(self, batch: int, height: int, width: int) -> KVCache:
        """An empty static cache for ``batch`` sequences of condition + ``height * width`` tokens."""
        w = self.output.weight
        return KVCache(self.config, batch, self.config.cls_token_num + height * width, w.dtype, w.device)

    # -- trunk and heads -------------------------------------------------------------------
    def hidden(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        grid: tuple[int, int],
        cache: KVCache | None = None,
        kv_len: int | None = None,
        column: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run embeddings ``x [B, S, dim]`` at ``positions [S]`` through the trunk (and column blocks).

        ``mask [S, K]`` (True = may attend) covers the keys: the ``S`` inputs themselves without a
        cache, or the first ``K = kv_len`` cache entries with one. Returns the trunk output (row
        head input) and, if ``column``, the column blocks' output.
        """
        if cache is not None and not (kv_len is not None and 0 < kv_len <= cache.max_len):
            raise ValueError(f"with a cache, kv_len must be in [1, {cache.max_len}], got {kv_len}")
        rope = self.rope(*grid)[positions]
        n_layer = self.config.n_layer
        if column and not self.config.column_blocks:
            raise ValueError(
                "this GPT has no column head (column_blocks=0); NAR decoding needs a NAR checkpoint"
            )
        h = x
        for i, layer in enumerate(self.layers[: n_layer + (self.config.column_blocks if column else 0)]):
            h = layer(h, rope, mask, None if cache is None else (cache, i, positions, kv_len))
            if i == n_layer - 1:
                trunk = h
        return trunk, (h if column else None)

    def row_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Row head: logits of the right neighbour (LlamaGen's next-token head)."""
        return self.output(self.norm(h)).float()

    def column_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Column head: logits of the neighbour below (from the column blocks' output)."""
        return self.medusa_output(self.medusa_norm(h)).float()

    # -- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, config: GPTConfig, map_location: str = "cpu") -> GPT:
        """Build a GPT and load LlamaGen/NAR weights from ``.safetensors`` or a ``torch.save`` file.

        Reads through :func:`mmaccel.tokenizers_img.vq.load_state_dict_file`: ``torch.load`` with
        ``weights_only=True`` and one allow-listed global, ``argparse.Namespace`` (LlamaGen/NAR
        training checkpoints store their ``args`` next to the weights), so nothing else in the file
        can run code. A ``{"model" | "state_dict" | "module" | "ema": ...}`` wrapper, ``module.`` /
        ``_orig_mod.`` prefixes and weight-free runtime entries (``freqs_cis``, masks, KV caches)
        are accepted. A file holding any other Python object is a ``ValueError``. Loading is strict.
        """
        from mmaccel.tokenizers_img.vq import load_state_dict_file

        path = Path(path)
        try:
            state = load_state_dict_file(path, map_location=map_location)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds Python objects other than tensors and argparse.Namespace "
                "(weights_only=True refused it); re-save its state dict with "
                "torch.save(ckpt['model'], ...) or as .safetensors"
            ) from err
        model = cls(config)
        model.load_state_dict(_clean_state_dict(state))
        return model.to(map_location)

    def save_checkpoint(self, path: str | Path) -> None:
        """Save the weights as ``.safetensors`` (by suffix) or with ``torch.save``."""
        path = Path(path)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path))
        else:
            torch.save(state, path)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        self.save_checkpoint(path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
        """Load a directory written by :meth:`save_pretrained`, in eval mode."""
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found; expected a save_pretrained directory")
        config = GPTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        return cls.from_checkpoint(path / WEIGHTS_NAME, config, map_location=str(map_location)).eval()


def _clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key in _RUNTIME_KEYS or ".kv_cache." in key:
            continue
        out[key] = value
    return out
