"""2-D VQ image tokenizer in the LlamaGen architecture.

Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation" (2024):
a convolutional encoder/decoder (taming-transformers style) around an L2-normalised codebook.
Module and parameter names follow LlamaGen's ``VQModel`` so its checkpoints (and NAR's, which
reuses it) load by path. Images are float tensors in [-1, 1], shape ``[B, C, H, W]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "VQConfig",
    "VQModel",
    "VQOutput",
    "VectorQuantizer",
    "load_state_dict_file",
    "resolve_checkpoint",
    "load_into",
    "check_images",
    "check_indices",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# LlamaGen ModelArgs fields that describe training bookkeeping, not the network.
_IGNORED_LLAMAGEN_FIELDS = frozenset({"codebook_show_usage"})
# Training-statistics buffer in LlamaGen checkpoints (a ring of recently used indices).
_IGNORED_KEYS = frozenset({"quantize.codebook_used"})


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _check_float(name: str, value: object, low: float, high: float, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok or math.isnan(value):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _as_int_tuple(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    for i, v in enumerate(value):
        _check_int(f"{name}[{i}]", v)
    return tuple(value)


@dataclass(frozen=True)
class VQConfig:
    """Architecture of a :class:`VQModel`; field names match LlamaGen's ``ModelArgs``.

    The defaults are LlamaGen's VQ_16 (codebook 16384 x 8, downsample 16). ``ch``,
    ``num_res_blocks``, ``norm_groups`` and ``in_channels`` are fixed in LlamaGen (128, 2, 32,
    3); they are fields here so tests can build tiny models. ``dead_code_restart`` (ours, 0 =
    off as in LlamaGen): in training, every that many forward passes the codes left unused are
    reset to random current encoder outputs, which keeps short from-scratch runs from
    collapsing onto a handful of codes.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32
    in_channels: int = 3
    dead_code_restart: int = 0

    def __post_init__(self) -> None:
        _check_int("dead_code_restart", self.dead_code_restart, low=0)
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks", "norm_groups", "in_channels"):
            _check_int(name, getattr(self, name))
        if not isinstance(self.codebook_l2_norm, bool):
            raise TypeError(f"codebook_l2_norm must be a bool, got {type(self.codebook_l2_norm).__name__}")
        _check_float("commit_loss_beta", self.commit_loss_beta, 0.0, math.inf)
        _check_float("entropy_loss_ratio", self.entropy_loss_ratio, 0.0, math.inf)
        _check_float("dropout_p", self.dropout_p, 0.0, 1.0, high_open=True)
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = _as_int_tuple(name, getattr(self, name))
            object.__setattr__(self, name, mult)
            for m in mult:
                if (self.ch * m) % self.norm_groups:
                    raise ValueError(
                        f"{name}: every ch * mult must be divisible by norm_groups={self.norm_groups}, "
                        f"got ch={self.ch}, mult={m}"
                    )
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                "encoder_ch_mult and decoder_ch_mult must have the same length (same downsample factor), "
                f"got {len(self.encoder_ch_mult)} and {len(self.decoder_ch_mult)}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def vq_16(cls, **overrides: object) -> VQConfig:
        """LlamaGen VQ_16 (downsample 16): the tokenizer used by LlamaGen and NAR."""
        return cls(**overrides)

    @classmethod
    def vq_8(cls, **overrides: object) -> VQConfig:
        """LlamaGen VQ_8 (downsample 8)."""
        return cls(**{"encoder_ch_mult": (1, 2, 2, 4), "decoder_ch_mult": (1, 2, 2, 4), **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> VQConfig:
        """Build from a dict (ours or LlamaGen's ``ModelArgs``); unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - _IGNORED_LLAMAGEN_FIELDS
        if unknown:
            raise ValueError(f"unknown VQConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def check_images(images: torch.Tensor, channels: int, multiple: int, image_size: int | None = None) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``images`` is float ``[B, channels, H, W]``, H and W multiples of ``multiple``."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor [B, C, H, W], got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"images must have shape [B, {channels}, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ValueError(f"images must be {image_size}x{image_size} for this tokenizer, got {h}x{w}")
    if h == 0 or w == 0 or h % multiple or w % multiple:
        raise ValueError(f"image height and width must be positive multiples of {multiple}, got {h}x{w}")


def check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    """Raise unless ``indices`` is an integer tensor with every value in [0, codebook_size)."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"indices must be in [0, {codebook_size}) (the codebook size), "
            f"got values in [{int(indices.min())}, {int(indices.max())}]"
        )


def _normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "b c h w -> b 1 (h w) c") for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in LlamaGen


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, ``attn`` blocks (lowest resolution only), resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module]) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        c, g, mult = config.ch, config.norm_groups, config.encoder_ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, c, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = c
        for level, m in enumerate(mult):
            last = level == len(mult) - 1
            res, attn = [], []
            for _ in range(config.num_res_blocks):
                res.append(ResnetBlock(block_in, c * m, config.dropout_p, g))
                block_in = c * m
                if last:
                    attn.append(AttnBlock(block_in, g))
            block = _Level(res, attn)
            if not last:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, config.dropout_p, g), AttnBlock(block_in, g),
             ResnetBlock(block_in, block_in, config.dropout_p, g)]
        )
        self.norm_out = _normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        c, g, mult = config.ch, config.norm_groups, config.decoder_ch_mult
        block_in = c * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, config.dropout_p, g), AttnBlock(block_in, g),
             ResnetBlock(block_in, block_in, config.dropout_p, g)]
        )
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            res, attn = [], []
            for _ in range(config.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, c * mult[level], config.dropout_p, g))
                block_in = c * mult[level]
                if level == len(mult) - 1:
                    attn.append(AttnBlock(block_in, g))
            block = _Level(res, attn)
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = block(h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus batch-average entropy of the soft code assignment (MaskGIT)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = logits.softmax(-1)
    avg = probs.mean(0)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    return sample_entropy + (avg * torch.log(avg + 1e-5)).sum()


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser over the last dimension; codes and inputs L2-normalised if ``l2_norm``.

    Returns the straight-through quantised tensor, the indices and the losses (VQ codebook loss,
    ``beta``-weighted commitment loss, ``entropy_ratio``-weighted entropy loss). With
    ``restart_every > 0``, training forwards count code usage and every ``restart_every`` calls
    re-initialise the unused codes from random inputs of the current batch.
    """

    def __init__(
        self, n_e: int, e_dim: int, beta: float, entropy_ratio: float, l2_norm: bool, restart_every: int = 0
    ) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.entropy_ratio, self.l2_norm, self.restart_every = entropy_ratio, l2_norm, restart_every
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("usage", torch.zeros(n_e), persistent=False)
        self._calls = 0

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Every ``restart_every`` training calls, reset codes unused since the last reset to rows of ``flat``."""
        self._calls += 1
        if self._calls % self.restart_every:
            return
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            picks = torch.randint(len(flat), (len(dead),), device=flat.device)
            self.embedding.weight[dead] = flat[picks].to(self.embedding.weight)
        self.usage.zero_()

    def codebook(self) -> torch.Tensor:
        """The code vectors as used for lookup (L2-normalised when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices``: shape ``[*indices.shape, e_dim]``."""
        return F.embedding(indices, self.codebook())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if z.shape[-1] != self.e_dim:
            raise ValueError(f"quantiser input must end in {self.e_dim} channels, got {tuple(z.shape)}")
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, self.e_dim)
        if self.training and self.restart_every:
            self._restart_dead_codes(flat)  # before the codebook enters the autograd graph
        emb = self.codebook()
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e
        dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        indices = dist.argmin(1).view(z.shape[:-1])
        z_q = F.embedding(indices, emb)
        if self.training and self.restart_every:
            self.usage += torch.bincount(indices.flatten(), minlength=self.n_e).to(self.usage)
        losses = {
            "codebook": F.mse_loss(z_q, z.detach()),
            "commit": self.beta * F.mse_loss(z, z_q.detach()),
            "entropy": self.entropy_ratio * _entropy_loss(-dist) if self.entropy_ratio > 0 else z.new_zeros(()),
        }
        return z + (z_q - z).detach(), indices, losses


@dataclass
class VQOutput:
    """Result of :meth:`VQModel.forward`: reconstruction, indices ``[B, h, w]`` and the losses."""

    reconstruction: torch.Tensor
    indices: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Training loss: pixel MSE plus the quantiser losses (LlamaGen adds LPIPS and a GAN)."""
        return F.mse_loss(self.reconstruction, images) + self.codebook_loss + self.commit_loss + self.entropy_loss


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    A torch file may hold the state dict itself or wrap it under ``model``, ``state_dict``,
    ``module`` or ``ema`` (LlamaGen training checkpoints use ``model``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device=str(map_location))
    # LlamaGen training checkpoints pickle their argparse Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or a dict wrapping one, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in ("model", "state_dict", "module", "ema"):
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    raise ValueError(f"{path}: no state dict found; top-level keys are {sorted(obj)[:10]}")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a checkpoint directory or weights file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        config = path / CONFIG_NAME
        if (path / WEIGHTS_NAME).exists():
            weights = path / WEIGHTS_NAME
        else:
            found = sorted(p for ext in ("*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt") for p in path.glob(ext))
            if len(found) != 1:
                raise ValueError(f"{path}: expected exactly one weights file, found {[p.name for p in found]}")
            weights = found[0]
    else:
        weights, config = path, path.with_name(CONFIG_NAME)
    return weights, config if config.exists() else None


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], ignored: frozenset[str] = frozenset()) -> None:
    """Strictly load ``state`` (minus ``ignored`` keys); mismatches raise ``ValueError`` naming keys."""
    state = {k: v for k, v in state.items() if k not in ignored}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint does not match {type(model).__name__}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong[:5]} ({len(wrong)})"
        )
    model.load_state_dict(state)


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: ``encode(images) -> indices [B, h, w]``, ``decode(indices) -> images``."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        if not isinstance(config, VQConfig):
            raise TypeError(f"config must be a VQConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(
            config.codebook_size, config.codebook_embed_dim, config.commit_loss_beta,
            config.entropy_loss_ratio, config.codebook_l2_norm, config.dead_code_restart,
        )
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        check_images(images, self.config.in_channels, self.downsample_factor)
        z = rearrange(self.quant_conv(self.encoder(images)), "b c h w -> b h w c")
        z_q, indices, losses = self.quantize(z)
        return rearrange(z_q, "b h w c -> b c h w"), indices, losses

    def forward(self, images: torch.Tensor) -> VQOutput:
        """Encode, quantise (straight-through) and decode; returns reconstruction and losses."""
        codes, indices, losses = self._quantize(images)
        return VQOutput(self.decode_codes(codes), indices, losses["codebook"], losses["commit"], losses["entropy"])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] (H, W multiples of the downsample factor) -> ``[B, H/f, W/f]`` long."""
        return self._quantize(images)[1]

    def codebook_lookup(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Indices ``[B, h, w]`` (or ``[B, h*w]`` with ``grid=(h, w)``) -> codes ``[B, D, h, w]``."""
        check_indices(indices, self.config.codebook_size)
        if indices.ndim == 2:
            if grid is None:
                raise ValueError("flat indices [B, N] need grid=(h, w)")
            if grid[0] * grid[1] != indices.shape[1]:
                raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1]} tokens, indices have {indices.shape[1]}")
            indices = indices.reshape(indices.shape[0], *grid)
        elif indices.ndim != 3:
            raise ValueError(f"indices must be [B, h, w] or [B, h*w], got shape {tuple(indices.shape)}")
        elif grid is not None and tuple(grid) != tuple(indices.shape[1:]):
            raise ValueError(f"grid {tuple(grid)} does not match indices of shape {tuple(indices.shape)}")
        return rearrange(self.quantize.lookup(indices.long()), "b h w c -> b c h w")

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised codes ``[B, D, h, w]`` -> images ``[B, C, h*f, w*f]``."""
        if codes.ndim != 4 or codes.shape[1] != self.config.codebook_embed_dim:
            raise ValueError(f"codes must be [B, {self.config.codebook_embed_dim}, h, w], got {tuple(codes.shape)}")
        return self.decoder(self.post_quant_conv(codes))

    def decode(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Indices ``[B, h, w]`` (or ``[B, h*w]`` with ``grid``) -> images ``[B, C, h*f, w*f]``."""
        return self.decode_codes(self.codebook_lookup(indices, grid))

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: VQConfig | None = None, map_location: str | torch.device = "cpu"
    ) -> VQModel:
        """Load from a directory or weights file (safetensors or torch.save; LlamaGen's ``vq_ds16_c2i.pt`` too).

        ``config`` defaults to the ``config.json`` next to the weights; a bare LlamaGen
        checkpoint has none, so pass e.g. ``VQConfig.vq_16()``.
        """
        weights, config_file = resolve_checkpoint(path)
        if config is None:
            if config_file is None:
                raise ValueError(f"{path}: no {CONFIG_NAME} found; pass config= (e.g. VQConfig.vq_16())")
            config = VQConfig.from_dict(json.loads(config_file.read_text()))
        model = cls(config)
        load_into(model, load_state_dict_file(weights, map_location), _IGNORED_KEYS)
        return model.eval()
