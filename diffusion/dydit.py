"""DyDiT / DyDiT++: timestep-wise dynamic width and spatial-wise dynamic tokens for DiT and PixArt.

DyDiT (Zhao et al., "Dynamic Diffusion Transformer", arXiv:2410.03456; DyDiT++, arXiv:2504.06803)
adds three small routers to every block of a pretrained diffusion transformer:

- **Timestep-wise dynamic width (TDW)**: two linear routers on the *timestep embedding* choose which
  attention-head groups and which MLP channel groups run. The choice depends on the timestep
  only, so at inference the kept rows/columns of ``to_q/to_k/to_v/to_out`` and of the MLP are
  sliced into small dense weights once per mask pattern (:meth:`DyDiTTransformer2DModel.precompute`
  for a sampling schedule): real FLOP savings, not masking.
- **Spatial-wise dynamic tokens (SDT)**: a per-token MLP router on the block's residual stream
  decides which tokens skip the MLP; kept tokens are gathered, run through the (pruned) MLP and
  scattered back with ``index_add``.
- **TD-LoRA** (DyDiT++): optional low-rank adapters on every pruned linear whose experts are mixed
  by a softmax router on the timestep embedding, so the adaptation depends on the timestep.

Routers use Gumbel-sigmoid with a straight-through hard threshold in training (``training_routers``)
and ``sigmoid > threshold`` at inference, as the reference code does. :func:`convert_to_dydit` builds
a :class:`DyDiTTransformer2DModel` from a dense ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel``
(copying its weights); the model takes the base model's forward arguments, so it drops into
``DiTPipeline`` / ``PixArtAlphaPipeline``, and saves/loads with ``save_pretrained`` /
``from_pretrained`` (safetensors). Fine-tune it with :mod:`mmaccel.diffusion.dydit_train`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

from mmaccel.diffusion.flexdit import (
    _STEMS,
    FlexDiTTransformer2DModel,
    _adopt_stem,
    _attn_input,
    _Cond,
    _index_batch,
    _Modulation,
    _modulation,
    timestep_values,
)
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.stats import Stats
from mmaccel.runtime.timesteps import HostTimesteps, read_timestep

__all__ = [
    "DyDiTConfig",
    "DyDiTTransformer2DModel",
    "DyDiTStats",
    "TDLoRA",
    "convert_to_dydit",
    "gumbel_sigmoid",
]

_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff_in", "ff_out")


def _check_number(name: str, value: object, low: float, high: float, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    bad = value <= low if low_open else value < low
    bad = bad or (value >= high if high_open else value > high)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def _check_int(name: str, value: object, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


@dataclass(frozen=True)
class DyDiTConfig:
    """DyDiT knobs. Defaults follow the reference code (DiT-XL/2, lambda 0.5 as in the paper).

    Args:
        target_flops_ratio: lambda, the FLOPs ratio (dynamic / dense) training aims at, in (0, 1].
        head_groups: attention head groups routed together; None = one group per head (reference).
            Must divide the number of heads.
        mlp_groups: MLP channel groups; None = as many as heads (reference). Must divide the MLP width.
        dynamic_width: enable TDW (head and MLP-group routers on the timestep embedding).
        dynamic_tokens: enable SDT (per-token router deciding who skips the MLP).
        router_init_bias: initial bias of the width routers (reference 15: all groups on).
        token_router_init_bias: initial bias of the token router's output (reference 35: all on).
        token_router_reduction: hidden width of the token router = width // this (reference 16).
        gumbel_tau: Gumbel-sigmoid temperature in training (reference 5).
        threshold: keep a group/token when sigmoid(logit) > threshold (reference 0.5).
        lora_rank: rank of each TD-LoRA expert; 0 disables TD-LoRA.
        lora_experts: LoRA experts mixed by the timestep router.
        lora_alpha: LoRA scale numerator (scale = alpha / rank); None = rank.
        lora_targets: which linears get adapters (subset of to_q, to_k, to_v, to_out, ff_in, ff_out).
        num_train_timesteps: valid range of the ``timestep`` argument.
    """

    target_flops_ratio: float = 0.5
    head_groups: int | None = None
    mlp_groups: int | None = None
    dynamic_width: bool = True
    dynamic_tokens: bool = True
    router_init_bias: float = 15.0
    token_router_init_bias: float = 35.0
    token_router_reduction: int = 16
    gumbel_tau: float = 5.0
    threshold: float = 0.5
    lora_rank: int = 0
    lora_experts: int = 4
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = _LORA_TARGETS
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check_number("target_flops_ratio (lambda)", self.target_flops_ratio, 0.0, 1.0, True, False)
        _check_int("head_groups", self.head_groups, 1, allow_none=True)
        _check_int("mlp_groups", self.mlp_groups, 1, allow_none=True)
        for name in ("dynamic_width", "dynamic_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_number("router_init_bias", self.router_init_bias, -1e4, 1e4, False, False)
        _check_number("token_router_init_bias", self.token_router_init_bias, -1e4, 1e4, False, False)
        _check_int("token_router_reduction", self.token_router_reduction, 1)
        _check_number("gumbel_tau", self.gumbel_tau, 0.0, 1e4, True, False)
        _check_number("threshold", self.threshold, 0.0, 1.0, True, True)
        _check_int("lora_rank", self.lora_rank, 0)
        _check_int("lora_experts", self.lora_experts, 1)
        if self.lora_alpha is not None:
            _check_number("lora_alpha", self.lora_alpha, 0.0, 1e6, True, False)
        targets = tuple(self.lora_targets) if isinstance(self.lora_targets, (list, tuple)) else None
        if not targets or any(t not in _LORA_TARGETS for t in targets):
            raise ValueError(f"lora_targets must be a non-empty subset of {_LORA_TARGETS}, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", targets)
        _check_int("num_train_timesteps", self.num_train_timesteps, 1)

    @property
    def logit_threshold(self) -> float:
        """``sigmoid(x) > threshold`` as a logit threshold."""
        return math.log(self.threshold / (1.0 - self.threshold))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DyDiTConfig:
        data = dict(data)
        if isinstance(data.get("lora_targets"), list):
            data["lora_targets"] = tuple(data["lora_targets"])
        return cls(**data)


# -- routers -----------------------------------------------------------------------------------
def gumbel_sigmoid(logits: torch.Tensor, tau: float, threshold: float, noise: bool) -> torch.Tensor:
    """Hard 0/1 keep decisions with a straight-through sigmoid gradient.

    ``noise=True`` adds logistic noise (the difference of two Gumbel draws) and divides by ``tau``,
    as in training; ``noise=False`` is the deterministic inference rule ``sigmoid(logits) > threshold``.
    """
    if noise:
        u = torch.rand_like(logits).clamp(1e-10, 1 - 1e-10)
        soft = ((logits + torch.log(u) - torch.log1p(-u)) / tau).sigmoid()
    else:
        soft = logits.sigmoid()
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


class BlockRouter(nn.Module):
    """One block's routers: heads and MLP groups from the timestep embedding, tokens from the stream."""

    def __init__(self, dim: int, head_groups: int, mlp_groups: int, reduction: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, head_groups)
        self.mlp = nn.Linear(dim, mlp_groups)
        hidden = max(1, dim // reduction)
        self.token = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @torch.no_grad()
    def reset(self, width_bias: float, token_bias: float, generator: torch.Generator) -> None:
        """Reference init: xavier-uniform weights, constant output biases (groups and tokens on)."""
        for layer in (self.head, self.mlp, self.token[0], self.token[2]):
            if layer.weight.is_meta:
                return
            bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
            layer.bias.zero_()
        self.head.bias.fill_(width_bias)
        self.mlp.bias.fill_(width_bias)
        self.token[2].bias.fill_(token_bias)


class TDLoRA(nn.Module):
    """Timestep-dependent LoRA for one linear: ``scale * B diag(g(t)) A x`` with ``g`` the softmax
    of a router on the timestep embedding, repeated over each expert's ``rank`` rows.

    ``B`` starts at zero (the adapter is off at init). ``in_index`` / ``out_index`` restrict it to the
    kept input columns / output rows of a pruned linear.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, experts: int, scale: float) -> None:
        super().__init__()
        self.rank, self.experts, self.scale = rank, experts, scale
        self.lora_A = nn.Parameter(torch.empty(rank * experts, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank * experts))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        if self.lora_A.is_meta:
            return
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.lora_B.zero_()

    def forward(
        self, x: torch.Tensor, gate: torch.Tensor, in_index: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        a = self.lora_A if in_index is None else self.lora_A.index_select(1, in_index)
        b = self.lora_B if out_index is None else self.lora_B.index_select(0, out_index)
        g = gate.repeat_interleave(self.rank, dim=-1)  # (B, R)
        low = F.linear(x, a) * g.view(g.shape[0], *([1] * (x.ndim - 2)), g.shape[-1])  # also 0 rows
        return self.scale * F.linear(low, b)


# -- statistics --------------------------------------------------------------------------------
class DyDiTStats(Stats):
    """Per forward call (one denoising step per batch of equal timesteps): FLOPs and what ran.

    ``steps`` holds one dict per call: ``timestep``, ``flops`` (dynamic, per sample), ``dense_flops``,
    ``heads`` / ``channels`` / ``tokens``: per-block active head count, MLP channel count and mean
    tokens through the MLP.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.steps = []

    def record(self, entry: dict[str, Any]) -> None:
        self.steps.append(entry)

    def summary(self) -> dict[str, int | float | bool | None]:
        if not self.steps:
            return {"steps": 0, "flops_ratio": None, "gflops_per_sample": None, "active_head_fraction": None,
                    "active_channel_fraction": None, "active_token_fraction": None}  # fmt: skip
        n = len(self.steps)
        first = self.steps[0]
        out: dict[str, int | float | bool | None] = {
            "steps": n,
            "flops_ratio": sum(s["flops"] / s["dense_flops"] for s in self.steps) / n,
            "gflops_per_sample": sum(s["flops"] for s in self.steps) / n / 1e9,
            "dense_gflops_per_sample": first["dense_flops"] / 1e9,
            "active_head_fraction": sum(sum(s["heads"]) / s["total_heads"] for s in self.steps) / n,
            "active_channel_fraction": sum(sum(s["channels"]) / s["total_channels"] for s in self.steps) / n,
            "active_token_fraction": sum(sum(s["tokens"]) / s["total_tokens"] for s in self.steps) / n,
        }
        for i in range(len(first["heads"])):
            out[f"block{i}_heads"] = sum(s["heads"][i] for s in self.steps) / n
            out[f"block{i}_channels"] = sum(s["channels"][i] for s in self.steps) / n
            out[f"block{i}_tokens"] = sum(s["tokens"][i] for s in self.steps) / n
        return out


# -- the model ---------------------------------------------------------------------------------
class DyDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A DiT / PixArt transformer with DyDiT routers; forward takes the base model's arguments.

    ``transformer_blocks`` are the dense model's blocks (same parameter names), ``routers`` one
    :class:`BlockRouter` per block, ``lora`` the TD-LoRA adapters (when ``lora_rank > 0``). Execution:
    ``"pruned"`` (default; sliced weights and gathered tokens, hard decisions) or ``"masked"`` (full
    computation multiplied by the 0/1 masks: the training form, also used to check the pruned one).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        base_class: str = "DiTTransformer2DModel",
        base_config: dict[str, Any] | None = None,
        dydit: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        dense = _adopt_stem(self, base_class, base_config)
        cfg = DyDiTConfig.from_dict(dydit or {})
        self.dydit = cfg
        self.transformer_blocks = dense.transformer_blocks
        shape = _check_supported(dense, cfg)
        self.dim, self.heads, self.head_dim, self.ff_dim, self.head_groups, self.mlp_groups = shape
        self.routers = nn.ModuleList(
            BlockRouter(self.dim, self.head_groups, self.mlp_groups, cfg.token_router_reduction)
            for _ in self.transformer_blocks
        )
        self.lora = nn.ModuleList()
        if cfg.lora_rank:
            scale = (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank
            sizes = {"to_q": (self.dim, self.dim), "to_k": (self.dim, self.dim), "to_v": (self.dim, self.dim),
                     "to_out": (self.dim, self.dim), "ff_in": (self.dim, self.ff_dim), "ff_out": (self.ff_dim, self.dim)}  # fmt: skip
            for _ in self.transformer_blocks:
                adapters = nn.ModuleDict(
                    {t: TDLoRA(*sizes[t], cfg.lora_rank, cfg.lora_experts, scale) for t in cfg.lora_targets}
                )
                adapters["gate"] = nn.Linear(self.dim, cfg.lora_experts)
                self.lora.append(adapters)
        self.reset_routers()
        self.gradient_checkpointing = False
        self.execution = "pruned"
        self.token_capacity: float | None = None
        self.host_timesteps: HostTimesteps | None = None
        self.router_noise = False
        self.stats = DyDiTStats()
        self._cache: dict[Any, Any] = {}
        self._last_masks: list[dict[str, torch.Tensor]] = []
        self._groups: list[tuple[list[int], list[dict[str, Any]] | None]] | None = None  # `_prepare`'s passes
        self._records: list[dict[str, list]] = []  # what this forward's passes ran, for `_record`
        # registered here, so a model built by from_pretrained has them too
        self.register_forward_pre_hook(self._prepare, with_kwargs=True)
        self.register_forward_hook(self._record)
        self.register_to_config(**base_config)  # mirrored for pipelines (transformer.config.sample_size, ...)

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        mirrored = set(config_dict.get("base_config") or {})
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k not in mirrored}, **kwargs)

    @torch.no_grad()
    def reset_routers(self, seed: int = 0) -> None:
        """Re-initialise routers (all groups and tokens on) and TD-LoRA (adapters off)."""
        gen = torch.Generator().manual_seed(seed)
        for router in self.routers:
            router.reset(self.dydit.router_init_bias, self.dydit.token_router_init_bias, gen)
        for adapters in self.lora:
            for module in adapters.values():
                if isinstance(module, TDLoRA):
                    module.reset(gen)
                elif not module.weight.is_meta:
                    module.weight.zero_()
                    module.bias.zero_()
        self.clear_cache()

    # -- modes --------------------------------------------------------------------------------
    def set_execution(self, mode: str) -> None:
        """``"pruned"`` (sliced weights, gathered tokens) or ``"masked"`` (dense compute x masks)."""
        if mode not in ("pruned", "masked"):
            raise ValueError(f"execution must be 'pruned' or 'masked', got {mode!r}")
        self.execution = mode

    def set_token_capacity(self, capacity: float | None) -> None:
        """Pruned token skipping with a fixed capacity (our option, not the reference's).

        ``None`` (reference): the tokens whose router logit passes the threshold are gathered with
        ``nonzero``, a data-dependent size (a host-device sync and a graph break per block).
        ``capacity`` in (0, 1]: each sample's ``ceil(capacity * N)`` highest-logit tokens are gathered
        (``topk``, a static shape) and those below the threshold get a zero MLP update. Equal to the
        reference whenever at most that many tokens pass; beyond it the lowest-logit passing tokens
        skip the MLP too.
        """
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
                raise TypeError(f"token capacity must be None or a float in (0, 1], got {capacity!r}")
            if not 0.0 < capacity <= 1.0:
                raise ValueError(f"token capacity must be None or a float in (0, 1], got {capacity!r}")
            capacity = float(capacity)
        self.token_capacity = capacity

    def use_scheduler_timesteps(self, scheduler: Any) -> None:
        """Read the ``timestep`` argument on the host from ``scheduler.timesteps``
        (`mmaccel.runtime.timesteps.HostTimesteps`): no device read per forward when the pipeline
        passes a view of the scheduler's timestep. ``None`` reads the tensor again."""
        self.host_timesteps = None if scheduler is None else HostTimesteps(scheduler)

    def _capacity(self, n: int) -> int:
        """Tokens the fixed-capacity gather takes out of ``n``."""
        return n if self.token_capacity is None else min(n, max(1, math.ceil(self.token_capacity * n)))

    @contextmanager
    def training_routers(self, noise: bool = True):
        """Masked execution with Gumbel noise (if ``noise``) for fine-tuning; restored on exit."""
        old = (self.execution, self.router_noise)
        self.execution, self.router_noise = "masked", noise
        try:
            yield self
        finally:
            self.execution, self.router_noise = old
            self.clear_cache()

    def clear_cache(self) -> None:
        """Forget precomputed per-timestep plans and pruned weights."""
        self._cache = {}

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    def lora_parameters(self) -> list[nn.Parameter]:
        return list(self.lora.parameters())

    # -- timestep embedding and width decisions ---------------------------------------------------
    def _time_embedding(self, index: int, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The timestep-only embedding (no class / resolution conditioning) the width routers read."""
        if self.base_class == "DiTTransformer2DModel":
            emb = self.transformer_blocks[index].norm1.emb
        else:
            emb = self.adaln_single.emb
        proj = emb.time_proj(timestep.flatten())
        return emb.timestep_embedder(proj.to(dtype))

    def _width_logits(self, index: int, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.routers[index]
        return router.head(temb), router.mlp(temb)

    def _plan(self, index: int, t: float, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Kept head/channel indices of block ``index`` at timestep ``t`` and their sliced weights."""
        key = (index, t)
        plan = self._cache.get(key)
        if plan is not None and plan["version"] == self._weights_version(index):
            return plan
        with torch.no_grad():
            temb = self._time_embedding(index, torch.tensor([t], device=device), dtype)
            head_logits, mlp_logits = self._width_logits(index, temb)
        th = self.dydit.logit_threshold
        if self.dydit.dynamic_width:
            head_keep, mlp_keep = head_logits[0] > th, mlp_logits[0] > th
        else:
            head_keep = torch.ones(self.head_groups, dtype=torch.bool, device=device)
            mlp_keep = torch.ones(self.mlp_groups, dtype=torch.bool, device=device)
        pattern = (tuple(head_keep.tolist()), tuple(mlp_keep.tolist()))
        weights = self._sliced_weights(index, pattern, device)
        plan = {"version": self._weights_version(index), "pattern": pattern, "temb": temb, **weights}
        if not torch.is_grad_enabled():
            self._cache[key] = plan
        return plan

    def _weights_version(self, index: int) -> int:
        return sum(p._version for p in self.transformer_blocks[index].parameters()) + sum(
            p._version for p in self.routers[index].parameters()
        ) + (sum(p._version for p in self.lora[index].parameters()) if self.lora else 0)

    def _sliced_weights(self, index: int, pattern: tuple, device: torch.device) -> dict[str, Any]:
        """Rows/columns of the kept heads and MLP groups, sliced once per (block, pattern)."""
        key = (index, pattern, self._weights_version(index))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        head_keep, mlp_keep = pattern
        per_head_group = self.heads // self.head_groups * self.head_dim
        per_mlp_group = self.ff_dim // self.mlp_groups
        attn_idx = _group_index(head_keep, per_head_group, device)
        ff_idx = _group_index(mlp_keep, per_mlp_group, device)
        block = self.transformer_blocks[index]
        attn, ff_in, ff_out = block.attn1, block.ff.net[0].proj, block.ff.net[2]
        dense_width = all(head_keep) and all(mlp_keep)
        out = {"attn_idx": attn_idx, "ff_idx": ff_idx, "dense_width": dense_width,
               "heads": int(sum(head_keep)) * (self.heads // self.head_groups), "channels": int(ff_idx.numel())}  # fmt: skip
        full_attn, full_ff = self.heads * self.head_dim, self.ff_dim
        qkv = (attn.to_q, attn.to_k, attn.to_v)
        out["qkv_w"] = torch.cat([_slice(m.weight, 0, attn_idx, full_attn) for m in qkv])
        biases = [m.bias for m in qkv]
        out["qkv_b"] = None if biases[0] is None else torch.cat([_slice(v, 0, attn_idx, full_attn) for v in biases])
        out["out_w"] = _slice(attn.to_out[0].weight, 1, attn_idx, full_attn)
        out["ff_in_w"] = _slice(ff_in.weight, 0, ff_idx, full_ff)
        out["ff_in_b"] = None if ff_in.bias is None else _slice(ff_in.bias, 0, ff_idx, full_ff)
        out["ff_out_w"] = _slice(ff_out.weight, 1, ff_idx, full_ff)
        if not torch.is_grad_enabled():
            out = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
            self._cache[key] = out
        # a compiled forward traces the kept widths as symbols from the start: one graph for all patterns
        for name, dim in (("qkv_w", 0), ("qkv_b", 0), ("out_w", 1), ("ff_in_w", 0), ("ff_in_b", 0), ("ff_out_w", 1)):
            if isinstance(out[name], torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(out[name], dim)
        return out

    @torch.no_grad()
    def precompute(self, timesteps: Any) -> dict[str, int]:
        """Decide the width of every block at each of ``timesteps`` and slice the weights once.

        Call with a scheduler's ``timesteps`` before sampling (forward also fills the cache lazily).
        Returns the number of timesteps and of distinct sliced weight sets.
        """
        ref = next(self.parameters())
        values = [float(t) for t in torch.as_tensor(timesteps).flatten()]
        for t in values:
            read_timestep(t, self.dydit.num_train_timesteps, source="precompute timesteps")
            for i in range(len(self.transformer_blocks)):
                self._plan(i, t, ref.device, ref.dtype)
        patterns = sum(1 for k in self._cache if len(k) == 3)
        return {"timesteps": len(set(values)), "weight_sets": patterns}

    # -- FLOPs ----------------------------------------------------------------------------------
    def _tokens_text(self, inputs: dict[str, Any], hidden_states: torch.Tensor) -> tuple[int, int]:
        n = (hidden_states.shape[-2] // self.patch_size) * (hidden_states.shape[-1] // self.patch_size)
        text = inputs.get("encoder_hidden_states")
        return n, (0 if text is None or self.base_class == "DiTTransformer2DModel" else text.shape[1])

    def block_flops(self, n: int, m: int, heads: Any, channels: Any, tokens: Any, extras: bool = True) -> Any:
        """Matmul FLOPs of one block per sample: ``n`` image tokens, ``m`` text tokens, ``heads`` active
        heads, ``channels`` active MLP channels, ``tokens`` through the MLP (numbers or tensors).
        ``extras`` adds the token router and the TD-LoRA adapters (absent from the dense model)."""
        d, width = self.dim, heads * self.head_dim
        flops = 2 * n * d * 3 * width + 4 * n * n * width + 2 * n * width * d + 4 * tokens * d * channels
        if m:
            flops = flops + 2 * n * d * d * 2 + 4 * m * d * d + 4 * n * m * d
        if self.base_class == "DiTTransformer2DModel":
            flops = flops + 2 * d * 6 * d + 2 * (256 * d + d * d)  # adaLN modulation + its timestep embedding
        if not extras:
            return flops
        if self.dydit.dynamic_tokens:
            hidden = max(1, d // self.dydit.token_router_reduction)
            flops = flops + 2 * n * (d * hidden + hidden)
        if self.lora:
            r = self.dydit.lora_rank * self.dydit.lora_experts
            sizes = {"to_q": (d, width), "to_k": (d, width), "to_v": (d, width), "to_out": (width, d)}
            for t in self.dydit.lora_targets:
                flops = flops + (2 * n * r * sum(sizes[t]) if t in sizes else 2 * tokens * r * (d + channels))
        return flops

    def stem_flops(self, n: int, m: int) -> int:
        """Patch embedding, output layers and shared embeddings, per sample."""
        d, p = self.dim, self.patch_size
        flops = 2 * n * self.config.in_channels * p * p * d + 2 * n * d * p * p * self.out_channels
        if self.base_class == "DiTTransformer2DModel":
            flops += 2 * d * 2 * d + 2 * (256 * d + d * d)  # proj_out_1 on block 0's embedding
        else:
            flops += 2 * (256 * d + d * d) + 2 * d * 6 * d
            if self.caption_projection is not None:
                flops += 2 * m * (self.caption_projection.linear_1.in_features * d + d * d)
        return flops

    def dense_flops(self, n: int, m: int = 0) -> int:
        """FLOPs per sample of the dense model (all heads, channels and tokens, no router, no adapter)."""
        per_block = self.block_flops(n, m, self.heads, self.ff_dim, n, extras=False)
        return self.stem_flops(n, m) + len(self.transformer_blocks) * per_block

    def flops_ratio_from_masks(self) -> torch.Tensor:
        """(B,) differentiable dynamic/dense FLOPs ratio of the last masked forward (the FLOPs loss input)."""
        if not self._last_masks:
            raise RuntimeError("no masked forward recorded; run the model under training_routers() first")
        _, n, m, _ = self._pending
        heads_per_group = self.heads // self.head_groups
        ch_per_group = self.ff_dim // self.mlp_groups
        total = self.stem_flops(n, m)
        for masks in self._last_masks:
            total = total + self.block_flops(
                n, m, masks["heads"].sum(-1) * heads_per_group, masks["channels"].sum(-1) * ch_per_group,
                masks["tokens"].sum(-1),
            )  # fmt: skip
        return total / self.dense_flops(n, m)

    # -- forward --------------------------------------------------------------------------------
    def original_block_prefixes(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(self.transformer_blocks))]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Same arguments (positional or keyword) and outputs as the base model's forward. Call the
        model (``model(...)``), not ``model.forward(...)``: the pre-hook `_prepare` takes the widths
        and the post-hook `_record` records the stats."""
        bound = self._base_signature.bind(self, hidden_states, *args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        del inputs["self"]
        return_dict = inputs.pop("return_dict")
        groups, self._groups = self._groups, None  # one decision per call
        if groups is None:
            raise RuntimeError("DyDiT's forward ran without its pre-hook: call the model, not .forward")
        batch = hidden_states.shape[0]
        t = torch.as_tensor(inputs["timestep"], device=hidden_states.device).flatten()
        inputs["timestep"] = t.expand(batch) if t.numel() == 1 else t
        records: list[dict[str, list]] = []
        if len(groups) == 1:
            output = self._forward(inputs, groups[0][1], records)
        else:  # pruned execution, mixed timesteps: one pass per timestep, same order back
            output = None
            for rows, plans in groups:
                idx = torch.tensor(rows, device=hidden_states.device)
                part_inputs = {k: _index_batch(val, idx, batch) for k, val in inputs.items()}
                part = self._forward(part_inputs, plans, records)
                output = part.new_empty((batch, *part.shape[1:])) if output is None else output
                output[idx] = part
        self._records = records
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    @torch.compiler.disable  # host-side decisions: a forward pre-hook, outside any compiled graph
    def _prepare(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: the passes to run, stored for the forward to read: ``(rows, per-block
        plans)`` per distinct timestep (pruned execution: width decisions and sliced weights), one
        pass with no plans (masked execution). Runs in ``__call__`` before the forward
        (``torch.compile(model)`` runs hooks outside dynamo's frame), so a compiled forward,
        ``fullgraph=True`` included, is pure and specialised on the kept widths, not on the timestep
        value. The values (read on the host, `use_scheduler_timesteps`) are kept for `_record`."""
        inputs = self._base_signature.bind(self, *args, **kwargs).arguments
        hidden_states, timestep = inputs["hidden_states"], inputs.get("timestep")
        if inputs.get("attention_mask") is not None:
            raise NotImplementedError("DyDiT does not support a self-attention mask over image tokens")
        if timestep is None:
            raise ValueError("DyDiT needs `timestep` (the width routers read it)")
        batch, device = hidden_states.shape[0], hidden_states.device
        values = timestep_values(self.host_timesteps, timestep, batch)
        for v in set(values):
            read_timestep(v, self.dydit.num_train_timesteps, source="the transformer's timestep argument")
        n, m = self._tokens_text(inputs, hidden_states)
        if self.execution == "masked":
            self._pending = ([values[0]], n, m, [None])
            self._groups = [(list(range(batch)), None)]
            return
        blocks = range(len(self.transformer_blocks))
        distinct = sorted(set(values))
        plans = {v: [self._plan(i, v, device, hidden_states.dtype) for i in blocks] for v in distinct}
        self._pending = (distinct, n, m, [plans[v] for v in distinct])
        self._groups = [([i for i, vi in enumerate(values) if vi == v], plans[v]) for v in distinct]

    def _forward(
        self, inputs: dict[str, Any], plans: list[dict[str, Any]] | None, records: list[dict[str, list]]
    ) -> torch.Tensor:
        """One pass at one timestep (pruned: with its ``plans``, appending the token counts that
        only the tensors know to ``records`` for `_record`; masked: keeping its masks)."""
        hidden_states = inputs["hidden_states"]
        grid = (hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size)
        x, cond, out_cond = FlexDiTTransformer2DModel._embed(self, inputs)
        self._last_masks = []
        record: dict[str, list] = {"heads": [], "channels": [], "tokens": []}
        masked = self.execution == "masked"
        for i in range(len(self.transformer_blocks)):
            if masked:
                fn = self._block_masked
                args = (i, x, cond, inputs["timestep"])
            else:
                fn = self._block_pruned
                args = (i, x, cond, plans[i], record)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(fn, *args)
            else:
                x = fn(*args)
        if not masked:
            records.append(record)
        out = FlexDiTTransformer2DModel._output(self, x, out_cond)
        return FlexDiTTransformer2DModel._unpatchify(self, out, grid)

    def _mask_record(self) -> dict[str, list]:
        """Mean widths and tokens of the last masked pass, read from its masks in one host read."""
        keys, scale = ("heads", "channels", "tokens"), (self.heads // self.head_groups, self.ff_dim // self.mlp_groups, 1)
        if not self._last_masks:
            return {key: [] for key in keys}
        means = torch.stack([torch.stack([m[key].float().sum(-1).mean() for key in keys]) for m in self._last_masks])
        per_key = zip(*means.tolist())  # (blocks, 3) -> 3 rows of per-block means
        return {key: [v * c for v in row] for key, c, row in zip(keys, scale, per_key)}

    @torch.compiler.disable  # a forward hook, after the (compiled) forward
    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: one stats entry per pass: widths from the host-side plans, tokens from the
        pass's record (reference gather), the fixed capacity, or (masked execution without
        gradients) the masks; a masked forward with gradients (training) records nothing."""
        records, self._records = self._records, []
        if self.execution == "masked":
            records = [] if torch.is_grad_enabled() else [self._mask_record()]
        values, n, m, plans = self._pending
        for t_value, record, block_plans in zip(values, records, plans):
            heads = record["heads"] or [p["heads"] for p in block_plans]
            channels = record["channels"] or [p["channels"] for p in block_plans]
            k = self._capacity(n) if self.dydit.dynamic_tokens else n
            tokens = record["tokens"] or [float(k)] * len(heads)
            flops = self.stem_flops(n, m) + sum(self.block_flops(n, m, h, c, tk) for h, c, tk in zip(heads, channels, tokens))
            self.stats.record({
                "timestep": t_value, "flops": float(flops), "dense_flops": float(self.dense_flops(n, m)),
                "heads": list(heads), "channels": list(channels), "tokens": list(tokens),
                "total_heads": self.heads * len(self.transformer_blocks),
                "total_channels": self.ff_dim * len(self.transformer_blocks),
                "total_tokens": n * len(self.transformer_blocks),
            })  # fmt: skip

    def _lora_gate(self, i: int, temb: torch.Tensor, batch: int) -> torch.Tensor | None:
        if not self.lora:
            return None
        gate = self.lora[i]["gate"](temb).softmax(-1)
        return gate.expand(batch, -1) if gate.shape[0] == 1 else gate

    def _lin(self, i: int, name: str, x: torch.Tensor, y: torch.Tensor, gate: Any, **index: Any) -> torch.Tensor:
        """``y`` plus the TD-LoRA term of linear ``name`` in block ``i`` (if it has one)."""
        if gate is None or name not in self.lora[i]:
            return y
        return y + self.lora[i][name](x, gate, **index)

    # pruned execution ---------------------------------------------------------------------------
    def _block_pruned(self, i: int, x: torch.Tensor, cond: _Cond, plan: dict[str, Any], record: dict) -> torch.Tensor:
        block = self.transformer_blocks[i]
        m = _modulation(block, cond, x)
        b, n, d = x.shape
        gate = self._lora_gate(i, plan["temb"], b)
        h = _attn_input(block, x, m)
        if plan["dense_width"] and gate is None:
            attn = block.attn1(h, **(cond.cross_attention_kwargs or {}))
        elif plan["heads"] == 0:
            bias = block.attn1.to_out[0].bias
            attn = torch.zeros_like(x) if bias is None else bias.expand_as(x)
        else:
            idx = plan["attn_idx"]
            q, k, v = F.linear(h, plan["qkv_w"], plan["qkv_b"]).chunk(3, dim=-1)
            if gate is not None:
                q, k, v = (self._lin(i, name, h, z, gate, out_index=idx) for name, z in zip(("to_q", "to_k", "to_v"), (q, k, v)))
            shape = (b, n, -1, self.head_dim)
            o = dispatch_attention_fn(q.reshape(shape), k.reshape(shape), v.reshape(shape)).flatten(2)
            attn = self._lin(i, "to_out", o, F.linear(o, plan["out_w"], block.attn1.to_out[0].bias), gate, in_index=idx)
        x = x + m.gate_msa * attn
        x = _text_attention(block, x, cond)
        h = _mlp_input(block, x, m)
        keep = None
        if self.dydit.dynamic_tokens and self.token_capacity is not None:
            return self._skip_tokens_fixed(i, x, h, m, plan, gate)
        if self.dydit.dynamic_tokens:
            keep = (self.routers[i].token(x)[..., 0] > self.dydit.logit_threshold)
            if not torch.compiler.is_compiling() and bool(keep.all()):  # compiled: no host sync, gather all
                keep = None
        if keep is None:
            record["tokens"].append(float(n))
            if plan["dense_width"] and gate is None:
                return x + m.gate_mlp * block.ff(h)
            return x + m.gate_mlp * self._ff_pruned(i, h, plan, gate)
        flat = keep.flatten().nonzero().squeeze(1)
        record["tokens"].append(flat.numel() / b)
        rows = flat // n
        y = self._ff_pruned(i, h.reshape(b * n, d).index_select(0, flat), plan, None if gate is None else gate[rows])
        update = m.gate_mlp.expand(b, 1, d)[:, 0].index_select(0, rows) * y
        return x.reshape(b * n, d).index_add(0, flat, update).view(b, n, d)

    def _skip_tokens_fixed(
        self, i: int, x: torch.Tensor, h: torch.Tensor, m: _Modulation, plan: dict[str, Any], gate: Any
    ) -> torch.Tensor:
        """Token skipping at a fixed capacity (`set_token_capacity`): gather each sample's top-k
        tokens by router logit (static shape, no ``nonzero``), zero the update of those below the
        threshold, scatter-add back."""
        b, n, d = x.shape
        logits = self.routers[i].token(x)[..., 0]
        k = self._capacity(n)
        if k == n:  # every token fits: masked update, no gather
            keep = (logits > self.dydit.logit_threshold).to(x.dtype)[..., None]
            return x + m.gate_mlp * self._ff_pruned(i, h, plan, gate) * keep
        top, idx = logits.topk(k, dim=1, sorted=False)
        rows = idx[..., None].expand(b, k, d)
        keep = (top > self.dydit.logit_threshold).to(x.dtype)[..., None]
        y = self._ff_pruned(i, h.gather(1, rows), plan, gate) * keep
        return x.scatter_add(1, rows, m.gate_mlp.expand(b, 1, d) * y)

    def _ff_pruned(self, i: int, h: torch.Tensor, plan: dict[str, Any], gate: Any) -> torch.Tensor:
        block = self.transformer_blocks[i]
        idx = plan["ff_idx"]
        z = self._lin(i, "ff_in", h, F.linear(h, plan["ff_in_w"], plan["ff_in_b"]), gate, out_index=idx)
        z = F.gelu(z, approximate=block.ff.net[0].approximate)
        return self._lin(i, "ff_out", z, F.linear(z, plan["ff_out_w"], block.ff.net[2].bias), gate, in_index=idx)

    # masked execution ---------------------------------------------------------------------------
    def _block_masked(self, i: int, x: torch.Tensor, cond: _Cond, timestep: torch.Tensor) -> torch.Tensor:
        block = self.transformer_blocks[i]
        attn1, router = block.attn1, self.routers[i]
        m = _modulation(block, cond, x)
        b, n, _ = x.shape
        temb = self._time_embedding(i, timestep, x.dtype)
        noise, tau, thr = self.router_noise, self.dydit.gumbel_tau, self.dydit.threshold
        if self.dydit.dynamic_width:
            head_logits, mlp_logits = self._width_logits(i, temb)
            heads = gumbel_sigmoid(head_logits, tau, thr, noise)
            channels = gumbel_sigmoid(mlp_logits, tau, thr, noise)
        else:
            heads, channels = x.new_ones(b, self.head_groups), x.new_ones(b, self.mlp_groups)
        gate = self._lora_gate(i, temb, b)
        h = _attn_input(block, x, m)
        q, k, v = (self._lin(i, name, h, getattr(attn1, name)(h), gate) for name in ("to_q", "to_k", "to_v"))
        shape = (b, n, self.heads, self.head_dim)
        o = dispatch_attention_fn(q.reshape(shape), k.reshape(shape), v.reshape(shape))
        o = (o * heads.repeat_interleave(self.heads // self.head_groups, dim=1)[:, None, :, None]).flatten(2)
        x = x + m.gate_msa * self._lin(i, "to_out", o, attn1.to_out[0](o), gate)
        x = _text_attention(block, x, cond)
        if self.dydit.dynamic_tokens:
            tokens = gumbel_sigmoid(router.token(x)[..., 0], tau, thr, noise)
        else:
            tokens = x.new_ones(b, n)
        h = _mlp_input(block, x, m)
        z = self._lin(i, "ff_in", h, block.ff.net[0].proj(h), gate)
        z = z * channels.repeat_interleave(self.ff_dim // self.mlp_groups, dim=1)[:, None, :]
        z = F.gelu(z, approximate=block.ff.net[0].approximate)
        y = self._lin(i, "ff_out", z, block.ff.net[2](z), gate)
        self._last_masks.append({"heads": heads, "channels": channels, "tokens": tokens})
        return x + m.gate_mlp * y * tokens[..., None]

    # -- adapters ---------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Router and TD-LoRA parameters only (what LoRA fine-tuning changes)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("routers.", "lora."))}

    def save_adapters(self, path: str | Path) -> Path:
        """Write routers + TD-LoRA to ``path/dydit_adapters.safetensors`` and the config to ``dydit_config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()},
                  str(path / "dydit_adapters.safetensors"))  # fmt: skip
        (path / "dydit_config.json").write_text(json.dumps({"base_class": self.base_class, "dydit": self.dydit.to_dict()}, indent=1))
        return path

    def load_adapters(self, path: str | Path) -> None:
        """Load what :meth:`save_adapters` wrote; ``ValueError`` if the adapter config differs."""
        path = Path(path)
        saved = json.loads((path / "dydit_config.json").read_text())
        if saved["base_class"] != self.base_class or DyDiTConfig.from_dict(saved["dydit"]) != self.dydit:
            raise ValueError(f"adapters at {path} were saved for {saved}, this model has {self.dydit}")
        state = load_file(str(path / "dydit_adapters.safetensors"))
        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            raise ValueError(f"adapter keys differ: missing {sorted(expected - set(state))[:4]}, "
                             f"unexpected {sorted(set(state) - expected)[:4]}")  # fmt: skip
        self.load_state_dict(state, strict=False)
        self.clear_cache()


def _group_index(keep: tuple[bool, ...], size: int, device: torch.device) -> torch.Tensor:
    groups = torch.tensor([g for g, k in enumerate(keep) if k], dtype=torch.long, device=device)
    return (groups[:, None] * size + torch.arange(size, device=device)[None]).flatten()


def _slice(weight: torch.Tensor, dim: int, idx: torch.Tensor, full: int) -> torch.Tensor:
    return weight if idx.numel() == full else weight.index_select(dim, idx)


def _text_attention(block: nn.Module, x: torch.Tensor, cond: _Cond) -> torch.Tensor:
    if block.attn2 is None:
        return x
    return block.attn2(x, encoder_hidden_states=cond.encoder_hidden_states,
                       attention_mask=cond.encoder_attention_mask, **(cond.cross_attention_kwargs or {})) + x  # fmt: skip


def _mlp_input(block: nn.Module, x: torch.Tensor, m: _Modulation) -> torch.Tensor:
    norm = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    return norm(x) * (1 + m.scale_mlp) + m.shift_mlp


def _check_supported(dense: nn.Module, cfg: DyDiTConfig) -> tuple[int, int, int, int, int, int]:
    """(width, heads, head_dim, MLP width, head groups, MLP groups); errors name the failing field."""
    blocks = dense.transformer_blocks
    if len(blocks) == 0:
        raise ValueError("the model has no transformer blocks")
    block = blocks[0]
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        raise NotImplementedError(f"DyDiT supports ada_norm_zero / ada_norm_single blocks, not {block.norm_type!r}")
    act = block.ff.net[0]
    if type(act).__name__ != "GELU" or not hasattr(act, "proj"):
        raise NotImplementedError(f"DyDiT supports GELU feed-forwards, got {type(act).__name__}")
    if block.attn1.norm_q is not None:
        raise NotImplementedError("DyDiT does not support query/key norms in self-attention")
    heads, dim = block.attn1.heads, block.dim
    head_dim = block.attn1.inner_dim // heads
    ff_dim = act.proj.out_features
    head_groups = cfg.head_groups or heads
    mlp_groups = cfg.mlp_groups or heads
    if heads % head_groups:
        raise ValueError(f"head_groups={head_groups} must divide the number of attention heads ({heads})")
    if ff_dim % mlp_groups:
        raise ValueError(f"mlp_groups={mlp_groups} must divide the MLP width ({ff_dim})")
    return dim, heads, head_dim, ff_dim, head_groups, mlp_groups


def convert_to_dydit(transformer: ModelMixin, config: DyDiTConfig | None = None) -> DyDiTTransformer2DModel:
    """A new :class:`DyDiTTransformer2DModel` holding copies of ``transformer``'s weights.

    Routers start with every group and token on (reference init), TD-LoRA adapters at zero, so the
    converted model reproduces ``transformer`` exactly until fine-tuned. ``transformer`` is not modified.
    """
    from accelerate import init_empty_weights

    config = resolve_config(config, DyDiTConfig)
    base_class = type(transformer).__name__
    if base_class not in _STEMS:
        raise TypeError(f"DyDiT supports {', '.join(sorted(_STEMS))}; got {base_class}")
    _check_supported(transformer, config)
    base_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = DyDiTTransformer2DModel(base_class=base_class, base_config=base_config, dydit=config.to_dict())
    ref = next(iter(transformer.state_dict().values()))
    fresh = _fresh_adapters(model, config)
    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    state.update({k: v.to(ref) for k, v in fresh.items()})
    expected = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    return model.to(ref.device).train(transformer.training)


def _fresh_adapters(model: DyDiTTransformer2DModel, cfg: DyDiTConfig) -> dict[str, torch.Tensor]:
    """Initial router / TD-LoRA tensors for ``model`` (whose own may be on the meta device)."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i, _ in enumerate(model.routers):
        router = BlockRouter(model.dim, model.head_groups, model.mlp_groups, cfg.token_router_reduction)
        router.reset(cfg.router_init_bias, cfg.token_router_init_bias, gen)
        out.update({f"routers.{i}.{k}": v for k, v in router.state_dict().items()})
    for i, adapters in enumerate(model.lora):
        for name, module in adapters.items():
            if isinstance(module, TDLoRA):
                fresh = TDLoRA(module.lora_A.shape[1], module.lora_B.shape[0], module.rank, module.experts, module.scale)
                fresh.reset(gen)
                out.update({f"lora.{i}.{name}.{k}": v for k, v in fresh.state_dict().items()})
            else:
                out.update({f"lora.{i}.{name}.weight": torch.zeros(module.weight.shape),
                            f"lora.{i}.{name}.bias": torch.zeros(module.bias.shape)})  # fmt: skip
    return out
