"""1-D compact image tokenizer with nested dropout (TiTok / FlexTok style).

Yu et al., "An Image is Worth 32 Tokens for Reconstruction and Generation" (TiTok, 2024), and
Bachmann et al., "FlexTok: Resampling Images into 1D Token Sequences of Flexible Length" (2025).
A ViT encoder reads image patches together with K learnable latent tokens; the latents attend
to all patches but only causally to each other, so token i never depends on tokens after it.
The latents are projected and quantised (FSQ or an L2-normalised VQ codebook). A ViT decoder
reconstructs patches from mask queries plus any prefix of the K tokens: training with nested
dropout (a random prefix length per image) makes every prefix length decode.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from mmaccel.tokenizers_img.vq import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    VectorQuantizer,
    check_images,
    check_indices,
    load_into,
    load_state_dict_file,
    resolve_checkpoint,
)

__all__ = ["Compact1DConfig", "Compact1DTokenizer", "Compact1DLoss", "FSQuantizer"]

_QUANTIZERS = ("fsq", "vq")


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


@dataclass(frozen=True)
class Compact1DConfig:
    """Architecture of a :class:`Compact1DTokenizer` (defaults: TiTok-S-like, 256 px -> 32 tokens).

    ``quantizer="fsq"`` uses ``fsq_levels`` (codebook = their product, token dim = their count);
    ``"vq"`` uses an L2-normalised ``codebook_size`` x ``token_dim`` codebook with
    ``commit_beta`` and, if ``dead_code_restart > 0``, dead-code restarts (see
    :class:`~mmaccel.tokenizers_img.vq.VQConfig`). ``nested_dropout`` trains every prefix length 1..K.
    """

    image_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    width: int = 512
    encoder_depth: int = 8
    decoder_depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 32
    quantizer: str = "fsq"
    fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    codebook_size: int = 4096
    token_dim: int = 12
    commit_beta: float = 0.25
    dead_code_restart: int = 0
    nested_dropout: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "width", "encoder_depth", "decoder_depth",
                     "num_heads", "num_latent_tokens", "codebook_size", "token_dim"):
            _check_int(name, getattr(self, name))
        _check_int("dead_code_restart", self.dead_code_restart, low=0)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.quantizer not in _QUANTIZERS:
            raise ValueError(f"quantizer must be one of {_QUANTIZERS}, got {self.quantizer!r}")
        if not isinstance(self.fsq_levels, (list, tuple)) or not self.fsq_levels:
            raise TypeError(f"fsq_levels must be a non-empty sequence of ints >= 2, got {self.fsq_levels!r}")
        for i, level in enumerate(self.fsq_levels):
            _check_int(f"fsq_levels[{i}]", level, low=2)
        object.__setattr__(self, "fsq_levels", tuple(self.fsq_levels))
        for name in ("mlp_ratio", "commit_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise TypeError(f"{name} must be a float, got {value!r}")
        if not 0 < self.mlp_ratio < math.inf:
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}")
        if not 0 <= self.commit_beta < math.inf:
            raise ValueError(f"commit_beta must be a finite number >= 0, got {self.commit_beta}")
        if not isinstance(self.nested_dropout, bool):
            raise TypeError(f"nested_dropout must be a bool, got {type(self.nested_dropout).__name__}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    @property
    def code_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.token_dim

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Compact1DConfig:
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ValueError(f"unknown Compact1DConfig fields {sorted(set(data) - known)}; allowed: {sorted(known)}")
        return cls(**data)


class FSQuantizer(nn.Module):
    """Finite scalar quantisation (Mentzer et al., 2023): bound each channel, round, straight-through."""

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        levels_t = torch.tensor(levels, dtype=torch.long)
        self.register_buffer("levels", levels_t, persistent=False)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), 0)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self.levels - 1) * (1 - 1e-3) / 2
        offset = (self.levels % 2 == 0).to(z.dtype) * 0.5
        return torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised code vectors in [-1, 1] for ``indices``: ``[*indices.shape, len(levels)]``."""
        half_width = self.levels // 2
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels
        return (digits - half_width).float() / half_width

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        bounded = self._bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = self.levels // 2
        indices = ((rounded.detach().round().long() + half_width) * self.basis).sum(-1)
        return rounded / half_width, indices, {}


class Block(nn.Module):
    """Pre-norm transformer block; ``mask`` is a boolean keep-mask broadcast to ``[B, heads, Q, K]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


@dataclass
class Compact1DLoss:
    """Training loss and its parts; ``prefix_lengths`` are the kept token counts per image."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    quantizer: torch.Tensor
    prefix_lengths: torch.Tensor


class Compact1DTokenizer(nn.Module):
    """``encode(images) -> indices [B, K]``; ``decode(indices[:, :k]) -> images`` for any 1 <= k <= K."""

    def __init__(self, config: Compact1DConfig) -> None:
        super().__init__()
        if not isinstance(config, Compact1DConfig):
            raise TypeError(f"config must be a Compact1DConfig, got {type(config).__name__}")
        self.config = config
        c, w, n, k = config, config.width, config.num_patches, config.num_latent_tokens
        self.patch_embed = nn.Conv2d(c.in_channels, w, c.patch_size, stride=c.patch_size)
        self.patch_pos = nn.Parameter(torch.randn(n, w) * 0.02)
        self.latent_tokens = nn.Parameter(torch.randn(k, w) * 0.02)
        self.encoder = nn.ModuleList(Block(w, c.num_heads, c.mlp_ratio) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(w)
        self.to_code = nn.Linear(w, c.code_dim)
        if c.quantizer == "fsq":
            self.quantize: nn.Module = FSQuantizer(c.fsq_levels)
        else:
            self.quantize = VectorQuantizer(
                c.codebook_size, c.token_dim, c.commit_beta, 0.0, l2_norm=True, restart_every=c.dead_code_restart
            )
        self.from_code = nn.Linear(c.code_dim, w)
        self.latent_pos = nn.Parameter(torch.randn(k, w) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(w) * 0.02)
        self.decoder_pos = nn.Parameter(torch.randn(n, w) * 0.02)
        self.decoder = nn.ModuleList(Block(w, c.num_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(w)
        self.to_pixels = nn.Linear(w, c.patch_size**2 * c.in_channels)
        # Encoder mask: patches see patches; latent i sees all patches and latents <= i.
        keep = torch.ones(n + k, n + k, dtype=torch.bool)
        keep[:n, n:] = False
        keep[n:, n:] = torch.ones(k, k, dtype=torch.bool).tril()
        self.register_buffer("encoder_mask", keep, persistent=False)

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        check_images(images, c.in_channels, c.patch_size, c.image_size)
        patches = rearrange(self.patch_embed(images), "b w h x -> b (h x) w") + self.patch_pos
        x = torch.cat([patches, self.latent_tokens.expand(images.shape[0], -1, -1)], 1)
        for block in self.encoder:
            x = block(x, self.encoder_mask)
        return self.to_code(self.encoder_norm(x[:, c.num_patches:]))

    def _decode(self, codes: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``[B, k, D]`` -> images; ``key_keep [B, k]`` hides dropped tokens from attention."""
        c, b, k = self.config, codes.shape[0], codes.shape[1]
        latents = self.from_code(codes) + self.latent_pos[:k]
        queries = (self.mask_token + self.decoder_pos).expand(b, -1, -1)
        x = torch.cat([queries, latents], 1)
        mask = None
        if key_keep is not None:
            patch_keep = key_keep.new_ones(b, c.num_patches)
            mask = torch.cat([patch_keep, key_keep], 1)[:, None, None, :]
        for block in self.decoder:
            x = block(x, mask)
        pixels = self.to_pixels(self.decoder_norm(x[:, : c.num_patches]))
        side = c.image_size // c.patch_size
        return rearrange(pixels, "b (h w) (p q ch) -> b ch (h p) (w q)", h=side, w=side, p=c.patch_size, q=c.patch_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, S, S]`` in [-1, 1] (S = ``image_size``) -> token ids ``[B, K]``."""
        return self.quantize(self._latents(images))[1]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, k]`` with 1 <= k <= K (a prefix of an encoding) -> images ``[B, C, S, S]``."""
        check_indices(indices, self.config.vocab_size)
        if indices.ndim != 2 or not 1 <= indices.shape[1] <= self.config.num_latent_tokens:
            raise ValueError(
                f"indices must be [B, k] with 1 <= k <= {self.config.num_latent_tokens}, got shape {tuple(indices.shape)}"
            )
        return self._decode(self.quantize.lookup(indices.long()).to(self.from_code.weight.dtype))

    def forward(self, images: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Compact1DLoss]:
        """Reconstruct ``images`` from the first ``prefix_lengths[b]`` tokens of each; returns (images, loss).

        ``prefix_lengths`` defaults to a uniform draw from 1..K per image in training mode with
        nested dropout, and to K otherwise.
        """
        b, k = images.shape[0], self.config.num_latent_tokens
        if prefix_lengths is None:
            if self.training and self.config.nested_dropout:
                prefix_lengths = torch.randint(1, k + 1, (b,), device=images.device)
            else:
                prefix_lengths = torch.full((b,), k, device=images.device)
        elif prefix_lengths.shape != (b,) or int(prefix_lengths.min()) < 1 or int(prefix_lengths.max()) > k:
            raise ValueError(f"prefix_lengths must be [B] with values in [1, {k}], got {prefix_lengths.tolist()}")
        codes, _, losses = self.quantize(self._latents(images))
        keep = torch.arange(k, device=images.device) < prefix_lengths[:, None]
        recon = self._decode(codes, keep)
        rec_loss = F.mse_loss(recon, images)
        q_loss = sum(losses.values(), rec_loss.new_zeros(()))
        return recon, Compact1DLoss(rec_loss + q_loss, rec_loss, q_loss, prefix_lengths)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Compact1DTokenizer:
        """Load a directory written by :meth:`save_pretrained` (or a weights file with ``config.json`` beside it)."""
        weights, config_file = resolve_checkpoint(path)
        if config_file is None:
            raise ValueError(f"{path}: no {CONFIG_NAME} next to the weights")
        model = cls(Compact1DConfig.from_dict(json.loads(config_file.read_text())))
        load_into(model, load_state_dict_file(weights, map_location))
        return model.eval()
