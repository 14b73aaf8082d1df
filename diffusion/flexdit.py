"""FlexDiT layout for diffusers' DiT and PixArt-alpha transformers.

FlexDiT (Chang et al., "FlexDiT: Dynamic Token Density Control for Diffusion Transformer",
arXiv:2412.06028) spends fewer tokens where a DiT needs fewer: bottom **Poolingformer** blocks
replace self-attention by the mean of V broadcast to every token; middle **Sparse-Dense Token
Modules** (SDTM) pool the dense tokens to a small grid, let those sparse tokens read the dense
ones by cross-attention, run ordinary blocks on the sparse tokens, and recover the dense tokens
with a block that merges the nearest-upsampled sparse tokens with the module's dense input
(``merge_sparse`` zero-init + ``merge_dense`` identity-init linear layers) and cross-attends to the
sparse tokens; top blocks stay dense. A temporal schedule (``mmaccel.runtime.budget`` schedules over
denoising progress) shrinks the sparse grid at high noise.

:func:`convert_to_flexdit` builds a :class:`FlexDiTTransformer2DModel` from a dense
``DiTTransformer2DModel`` / ``PixArtTransformer2DModel``, reusing every pretrained block (in
order) and copying the weights, so the input is left untouched. The new model takes exactly the
original forward's arguments, so it drops into ``DiTPipeline`` / ``PixArtAlphaPipeline``, and
saves/loads with ``save_pretrained`` / ``from_pretrained`` (safetensors). Without fine-tuning
(``mmaccel.diffusion.train``) its output differs from the dense model's: the SDTM skips the dense path.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import diffusers
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from mmaccel.runtime.adapters import dit
from mmaccel.runtime.budget import (
    ConstantSchedule,
    CosineSchedule,
    DensitySchedule,
    LinearSchedule,
    StepSchedule,
)
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.timesteps import HostTimesteps

__all__ = [
    "FlexDiTConfig",
    "FlexDiTTransformer2DModel",
    "BlockTokens",
    "convert_to_flexdit",
    "pool_tokens",
    "upsample_tokens",
]

#: Base classes the layout supports, with the non-block submodules the FlexDiT model keeps.
_STEMS: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("pos_embed", "norm_out", "proj_out_1", "proj_out_2"),
    "PixArtTransformer2DModel": (
        "pos_embed", "adaln_single", "caption_projection", "norm_out", "scale_shift_table", "proj_out",
    ),
}  # fmt: skip
assert set(_STEMS) == set(dit.TRANSFORMERS), "FlexDiT's stems must cover the DiT adapter's classes"
_SCHEDULES = {cls.__name__: cls for cls in (ConstantSchedule, LinearSchedule, CosineSchedule, StepSchedule)}
_MERGE_INITS = ("dense", "upsampled")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


@dataclass(frozen=True)
class FlexDiTConfig:
    """Where FlexDiT spends tokens. Defaults are the paper's DiT-XL/2 layout (28 blocks).

    Blocks of the dense model are assigned in order: ``pooling_blocks`` Poolingformer blocks,
    then ``num_modules`` SDTMs of ``module_layout = (cross, sparse, recovery, dense)`` blocks
    each (``recovery`` must be 1), then ``top_dense_blocks`` dense blocks; the total must equal
    the model's ``num_layers``. ``sparse_grid`` is the (rows, cols) of the pooled tokens at full
    density; ``schedule`` maps denoising progress (0 = pure noise, read from the timestep as
    ``1 - t / num_train_timesteps``) to the fraction of those tokens kept. ``merge_init`` picks
    which recovery merge layer starts as identity: ``"dense"`` (paper: the module's dense input)
    or ``"upsampled"`` (the upsampled sparse tokens; with a full-size sparse grid the converted
    model then reproduces the dense one exactly).
    """

    pooling_blocks: int = 2
    num_modules: int = 4
    module_layout: tuple[int, int, int, int] = (2, 2, 1, 1)
    top_dense_blocks: int = 2
    sparse_grid: tuple[int, int] = (8, 8)
    schedule: DensitySchedule = ConstantSchedule(1.0)
    merge_init: str = "dense"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check_int("pooling_blocks", self.pooling_blocks, 0)
        _check_int("num_modules", self.num_modules, 0)
        _check_int("top_dense_blocks", self.top_dense_blocks, 0)
        _check_int("num_train_timesteps", self.num_train_timesteps, 1)
        layout = tuple(self.module_layout) if isinstance(self.module_layout, (tuple, list)) else None
        if layout is None or len(layout) != 4:
            raise ValueError(
                f"module_layout must be 4 ints (cross, sparse, recovery, dense), got {self.module_layout!r}"
            )
        for name, value in zip(("cross", "sparse", "dense"), (layout[0], layout[1], layout[3])):
            _check_int(f"module_layout {name} blocks", value, 0)
        if layout[2] != 1 or isinstance(layout[2], bool):
            raise ValueError(f"module_layout recovery blocks must be exactly 1, got {layout[2]!r}")
        grid = tuple(self.sparse_grid) if isinstance(self.sparse_grid, (tuple, list)) else None
        if grid is None or len(grid) != 2:
            raise ValueError(f"sparse_grid must be (rows, cols), got {self.sparse_grid!r}")
        for name, value in zip(("rows", "cols"), grid):
            _check_int(f"sparse_grid {name}", value, 1)
        if not isinstance(self.schedule, tuple(_SCHEDULES.values())):
            raise TypeError(
                f"schedule must be one of {sorted(_SCHEDULES)} from mmaccel.runtime.budget, got {self.schedule!r}"
            )
        if self.merge_init not in _MERGE_INITS:
            raise ValueError(f"merge_init must be one of {_MERGE_INITS}, got {self.merge_init!r}")
        object.__setattr__(self, "module_layout", layout)
        object.__setattr__(self, "sparse_grid", grid)

    @property
    def num_layers(self) -> int:
        """Dense blocks the layout consumes."""
        return self.pooling_blocks + self.num_modules * sum(self.module_layout) + self.top_dense_blocks

    def sparse_grid_at(self, progress: float) -> tuple[int, int]:
        """The pooled grid at denoising ``progress``: each side scaled by sqrt(keep ratio)."""
        scale = math.sqrt(self.schedule(progress))
        return tuple(max(1, round(side * scale)) for side in self.sparse_grid)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in the model's config.json)."""
        out = dataclasses.asdict(self)
        out["module_layout"] = list(self.module_layout)
        out["sparse_grid"] = list(self.sparse_grid)
        out["schedule"] = {"type": type(self.schedule).__name__, **dataclasses.asdict(self.schedule)}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlexDiTConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if isinstance(data.get("schedule"), dict):
            sched = dict(data["schedule"])
            kind = sched.pop("type", None)
            if kind not in _SCHEDULES:
                raise ValueError(f"schedule type must be one of {sorted(_SCHEDULES)}, got {kind!r}")
            data["schedule"] = _SCHEDULES[kind](
                **{k: tuple(v) if isinstance(v, list) else v for k, v in sched.items()}
            )
        for key in ("module_layout", "sparse_grid"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)


class BlockTokens(NamedTuple):
    """Tokens one block processes: its role, query tokens and key/value tokens of self/cross attention."""

    role: str
    queries: int
    keys: int


# -- token reduction ---------------------------------------------------------------------------
def pool_tokens(x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of ``(B, h*w, C)`` row-major tokens to ``out_grid``."""
    image = rearrange(x, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    return rearrange(F.adaptive_avg_pool2d(image, out_grid), "b c h w -> b (h w) c")


def upsample_tokens(x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of ``(B, h*w, C)`` row-major tokens to ``out_grid``."""
    image = rearrange(x, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    return rearrange(F.interpolate(image, size=out_grid, mode="nearest"), "b c h w -> b (h w) c")


# -- blocks ------------------------------------------------------------------------------------
class _Cond(NamedTuple):
    """What every block needs besides the tokens (as the dense model passes it to its blocks)."""

    timestep: torch.Tensor  # DiT: raw timesteps; PixArt: adaln_single's (B, 6 * dim) embedding
    class_labels: torch.Tensor | None
    encoder_hidden_states: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None
    cross_attention_kwargs: dict[str, Any] | None


class _Modulation(NamedTuple):
    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


def _modulation(block: BasicTransformerBlock, cond: _Cond, x: torch.Tensor) -> _Modulation:
    """The block's adaLN shift/scale/gate tensors, each ``(B, 1, dim)``, as its own forward computes them."""
    if block.norm_type == "ada_norm_zero":
        emb = block.norm1.emb(cond.timestep, cond.class_labels, hidden_dtype=x.dtype)
        return _Modulation(*block.norm1.linear(block.norm1.silu(emb))[:, None].chunk(6, dim=-1))
    table = block.scale_shift_table[None] + cond.timestep.reshape(x.shape[0], 6, -1)
    return _Modulation(*table.chunk(6, dim=1))


def _attn_input(block: BasicTransformerBlock, x: torch.Tensor, m: _Modulation) -> torch.Tensor:
    norm = block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1
    return norm(x) * (1 + m.scale_msa) + m.shift_msa


def _text_and_ff(block: BasicTransformerBlock, x: torch.Tensor, m: _Modulation, cond: _Cond) -> torch.Tensor:
    """Text cross-attention (PixArt) and the gated feed-forward, as in ``BasicTransformerBlock``."""
    kwargs = dict(cond.cross_attention_kwargs or {})
    if block.attn2 is not None:
        x = block.attn2(x, encoder_hidden_states=cond.encoder_hidden_states,
                        attention_mask=cond.encoder_attention_mask, **kwargs) + x  # fmt: skip
    norm = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    return m.gate_mlp * block.ff(norm(x) * (1 + m.scale_mlp) + m.shift_mlp) + x


def _run_dense(block: BasicTransformerBlock, x: torch.Tensor, cond: _Cond) -> torch.Tensor:
    return block(x, None, cond.encoder_hidden_states, cond.encoder_attention_mask, cond.timestep,
                 cond.cross_attention_kwargs, cond.class_labels)  # fmt: skip


class PoolingformerBlock(nn.Module):
    """A pretrained block whose self-attention is the mean of V broadcast to every token.

    The query/key projections are dropped; ``to_v`` is affine, so V of the token mean equals
    the mean of V and costs one token instead of ``N``.
    """

    def __init__(self, block: BasicTransformerBlock) -> None:
        super().__init__()
        block.attn1.to_q = None
        block.attn1.to_k = None
        self.block = block

    def forward(self, x: torch.Tensor, cond: _Cond) -> torch.Tensor:
        block = self.block
        m = _modulation(block, cond, x)
        h = _attn_input(block, x, m).mean(dim=1, keepdim=True)
        out = block.attn1.to_out[1](block.attn1.to_out[0](block.attn1.to_v(h)))
        return _text_and_ff(block, x + m.gate_msa * out, m, cond)


class SparseFromDenseBlock(nn.Module):
    """A pretrained block whose sparse queries attend to the dense tokens (sparse <- dense)."""

    def __init__(self, block: BasicTransformerBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, cond: _Cond) -> torch.Tensor:
        block = self.block
        m = _modulation(block, cond, sparse)
        attn = block.attn1(_attn_input(block, sparse, m), encoder_hidden_states=_attn_input(block, dense, m),
                           **(cond.cross_attention_kwargs or {}))  # fmt: skip
        return _text_and_ff(block, sparse + m.gate_msa * attn, m, cond)


class RecoveryBlock(nn.Module):
    """Recovers dense tokens: merge (upsampled sparse, dense input), then attend to the sparse tokens."""

    def __init__(self, block: BasicTransformerBlock, merge_init: str) -> None:
        super().__init__()
        dim = block.dim
        self.block = block
        self.merge_init = merge_init
        self.merge_sparse = nn.Linear(dim, dim)
        self.merge_dense = nn.Linear(dim, dim)
        self.reset_merge()

    def initial_merge_state(self) -> dict[str, torch.Tensor]:
        """The merge layers' initial weights: identity on one input, zero on the other."""
        dim = self.block.dim
        eye, zero = torch.eye(dim), torch.zeros(dim, dim)
        identity_sparse = self.merge_init == "upsampled"
        return {
            "merge_sparse.weight": eye if identity_sparse else zero, "merge_sparse.bias": torch.zeros(dim),
            "merge_dense.weight": zero if identity_sparse else eye, "merge_dense.bias": torch.zeros(dim),
        }  # fmt: skip

    @torch.no_grad()
    def reset_merge(self) -> None:
        """Re-initialise the merge layers (no-op on meta tensors)."""
        for name, value in self.initial_merge_state().items():
            layer, attr = name.split(".")
            param = getattr(getattr(self, layer), attr)
            if not param.is_meta:
                param.copy_(value)

    def merge(
        self, sparse: torch.Tensor, dense: torch.Tensor, grid: tuple[int, int], sparse_grid: tuple[int, int]
    ) -> torch.Tensor:
        """``merge_sparse(upsample(sparse)) + merge_dense(dense)``; ``merge_sparse`` acts per token, so
        it commutes with nearest upsampling and runs on the few sparse tokens."""
        return upsample_tokens(self.merge_sparse(sparse), sparse_grid, grid) + self.merge_dense(dense)

    def forward(
        self,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        grid: tuple[int, int],
        sparse_grid: tuple[int, int],
        cond: _Cond,
    ) -> torch.Tensor:
        block = self.block
        merged = self.merge(sparse, dense, grid, sparse_grid)
        m = _modulation(block, cond, merged)
        attn = block.attn1(_attn_input(block, merged, m), encoder_hidden_states=_attn_input(block, sparse, m),
                           **(cond.cross_attention_kwargs or {}))  # fmt: skip
        return _text_and_ff(block, merged + m.gate_msa * attn, m, cond)


class SparseDenseTokenModule(nn.Module):
    """Pool -> sparse<-dense cross blocks -> sparse blocks -> recovery -> dense blocks."""

    def __init__(
        self, blocks: list[BasicTransformerBlock], layout: tuple[int, int, int, int], merge_init: str
    ) -> None:
        super().__init__()
        it = iter(blocks)
        self.cross = nn.ModuleList(SparseFromDenseBlock(next(it)) for _ in range(layout[0]))
        self.sparse = nn.ModuleList(next(it) for _ in range(layout[1]))
        self.recovery = RecoveryBlock(next(it), merge_init)
        self.dense = nn.ModuleList(next(it) for _ in range(layout[3]))

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        sparse_grid: tuple[int, int],
        cond: _Cond,
        run: Callable[..., Any],
    ) -> torch.Tensor:
        sparse = pool_tokens(x, grid, sparse_grid)
        for block in self.cross:
            sparse = run(block, sparse, x, cond)
        for block in self.sparse:
            sparse = run(_run_dense, block, sparse, cond)
        x = run(self.recovery, sparse, x, grid, sparse_grid, cond)
        for block in self.dense:
            x = run(_run_dense, block, x, cond)
        return x


# -- the model ---------------------------------------------------------------------------------
def timestep_values(host: HostTimesteps | None, timestep: Any, batch: int) -> list[float]:
    """The ``timestep`` argument as one host float per sample: found in the scheduler's timesteps
    by ``host`` without a device read, else read from the tensor (one sync)."""
    found = host.lookup(timestep) if host is not None else None
    if found is not None:
        return [found] * batch
    t = torch.as_tensor(timestep, dtype=torch.float64).flatten().cpu().tolist()
    return t * batch if len(t) == 1 else t


def _index_batch(value: Any, idx: torch.Tensor, batch: int) -> Any:
    """``value`` restricted to the samples ``idx`` when it has a batch dimension."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[idx]
    if isinstance(value, dict):
        return {k: _index_batch(v, idx, batch) for k, v in value.items()}
    return value


def _adopt_stem(model: nn.Module, base_class: str, base_config: dict[str, Any] | None) -> ModelMixin:
    """Build the dense ``base_class`` from its saved config (private ``_`` keys dropped), give
    ``model`` its stem modules (embeddings, norms, output projection) and the attributes a converted
    model shares with it; returns the dense model, whose blocks the caller takes over."""
    if base_class not in _STEMS:
        raise TypeError(f"base_class must be one of {sorted(_STEMS)}, got {base_class!r}")
    base_config = {k: v for k, v in (base_config or {}).items() if not k.startswith("_")}
    dense = getattr(diffusers, base_class)(**base_config)
    model.base_class = base_class
    model.out_channels = dense.out_channels
    model.patch_size = dense.config.patch_size
    model.use_additional_conditions = getattr(dense, "use_additional_conditions", False)
    model._base_signature = inspect.signature(type(dense).forward)
    for name in _STEMS[base_class]:
        setattr(model, name, getattr(dense, name))
    return dense


class FlexDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A DiT / PixArt transformer in the FlexDiT layout; forward takes the base model's arguments.

    The config stores ``base_class``, ``base_config`` and ``flexdit`` (a :class:`FlexDiTConfig`
    dict), and mirrors the base config's keys (``sample_size``, ``in_channels``, ...) so that
    pipelines reading ``transformer.config`` work unchanged. Build one with
    :func:`convert_to_flexdit`; reload with ``from_pretrained``.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    # regional compilation (compile_repeated_blocks): the modules the forward calls once per layer
    _repeated_blocks = ["PoolingformerBlock", "SparseDenseTokenModule", "BasicTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        base_class: str = "DiTTransformer2DModel",
        base_config: dict[str, Any] | None = None,
        flexdit: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        dense = _adopt_stem(self, base_class, base_config)
        flex = FlexDiTConfig.from_dict(flexdit or {})
        _check_fits(flex, dense)
        self.flex = flex
        blocks = list(dit.blocks(dense))
        p, per = flex.pooling_blocks, sum(flex.module_layout)
        self.pooling_blocks = nn.ModuleList(PoolingformerBlock(b) for b in blocks[:p])
        self.sdt_modules = nn.ModuleList(
            SparseDenseTokenModule(
                blocks[p + i * per : p + (i + 1) * per], flex.module_layout, flex.merge_init
            )
            for i in range(flex.num_modules)
        )
        self.dense_blocks = nn.ModuleList(blocks[p + flex.num_modules * per :])
        self.gradient_checkpointing = False
        self.host_timesteps: HostTimesteps | None = None
        self._grids: list[tuple[int, int]] | None = None  # this forward's decision (`_decide`)
        # registered here, so a model built by from_pretrained has it too
        self.register_forward_pre_hook(self._decide, with_kwargs=True)
        self.register_to_config(**base_config)  # mirrored for pipelines (transformer.config.sample_size, ...)

    def use_scheduler_timesteps(self, scheduler: Any) -> None:
        """Read the ``timestep`` argument on the host from ``scheduler.timesteps``
        (`mmaccel.runtime.timesteps.HostTimesteps`): no device read per forward when the pipeline
        passes a view of the scheduler's timestep (diffusers' DiT and PixArt pipelines do).
        ``None`` reads the tensor again."""
        self.host_timesteps = None if scheduler is None else HostTimesteps(scheduler)

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # The mirrored base keys are not __init__ arguments: drop them instead of warning on load.
        mirrored = set(config_dict.get("base_config") or {})
        return super().extract_init_dict(
            {k: v for k, v in config_dict.items() if k not in mirrored}, **kwargs
        )

    # -- layout ---------------------------------------------------------------------------------
    def original_block_prefixes(self) -> list[str]:
        """For each block of the dense model, in order, the module path that now holds it."""
        out = [f"pooling_blocks.{i}.block" for i in range(len(self.pooling_blocks))]
        for m, module in enumerate(self.sdt_modules):
            out += [f"sdt_modules.{m}.cross.{i}.block" for i in range(len(module.cross))]
            out += [f"sdt_modules.{m}.sparse.{i}" for i in range(len(module.sparse))]
            out += [f"sdt_modules.{m}.recovery.block"]
            out += [f"sdt_modules.{m}.dense.{i}" for i in range(len(module.dense))]
        return out + [f"dense_blocks.{i}" for i in range(len(self.dense_blocks))]

    def feature_alignment(self) -> list[tuple[str, int]]:
        """(module path, dense block index) pairs whose outputs are both full-resolution token states.

        Used by the distillation feature loss: Poolingformer blocks, each SDTM and the top dense
        blocks, against the dense model's block that ends at the same depth.
        """
        pairs = [(f"pooling_blocks.{i}", i) for i in range(len(self.pooling_blocks))]
        depth, per = len(self.pooling_blocks), sum(self.flex.module_layout)
        for m in range(len(self.sdt_modules)):
            depth += per
            pairs.append((f"sdt_modules.{m}", depth - 1))
        return pairs + [(f"dense_blocks.{i}", depth + i) for i in range(len(self.dense_blocks))]

    def progress(self, timestep: torch.Tensor) -> torch.Tensor:
        """Denoising progress per timestep: ``1 - t / num_train_timesteps`` clamped to [0, 1]."""
        t = torch.as_tensor(timestep, dtype=torch.float64).flatten().cpu()
        return (1.0 - t / self.flex.num_train_timesteps).clamp(0.0, 1.0)

    def token_counts(self, grid: tuple[int, int], timestep: float | torch.Tensor) -> list[BlockTokens]:
        """Tokens each block processes, bottom to top, for a ``grid`` of dense tokens at ``timestep``."""
        n = grid[0] * grid[1]
        s = math.prod(self._sparse_grid(grid, float(self.progress(timestep).max())))
        counts = [BlockTokens("pooling", n, 1) for _ in self.pooling_blocks]
        for module in self.sdt_modules:
            counts += [BlockTokens("sparse<-dense", s, n) for _ in module.cross]
            counts += [BlockTokens("sparse", s, s) for _ in module.sparse]
            counts += [BlockTokens("recovery", n, s)]
            counts += [BlockTokens("dense", n, n) for _ in module.dense]
        return counts + [BlockTokens("dense", n, n) for _ in self.dense_blocks]

    def _sparse_grid(self, grid: tuple[int, int], progress: float) -> tuple[int, int]:
        sparse = self.flex.sparse_grid_at(progress)
        if self.sdt_modules and (sparse[0] > grid[0] or sparse[1] > grid[1]):
            raise ValueError(
                f"sparse_grid {self.flex.sparse_grid} exceeds the token grid {grid} of this input"
            )
        return sparse

    # -- forward --------------------------------------------------------------------------------
    @torch.compiler.disable  # host-side decision: a forward pre-hook, outside any compiled graph
    def _decide(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: the sparse grid of each sample, stored for the forward to read.

        Runs in ``__call__`` before the forward (``torch.compile(model)`` runs hooks outside
        dynamo's frame), so a compiled forward, ``fullgraph=True`` included, is pure and
        specialised on the grids, not on the timestep."""
        inputs = self._base_signature.bind(self, *args, **kwargs).arguments
        timestep, hidden_states = inputs.get("timestep"), inputs["hidden_states"]
        if inputs.get("attention_mask") is not None:
            raise NotImplementedError("FlexDiT does not support a self-attention mask over image tokens")
        if timestep is None:
            raise ValueError("FlexDiT needs `timestep` (it sets the token density)")
        batch = hidden_states.shape[0]
        grid = (hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size)
        n = self.flex.num_train_timesteps
        values = timestep_values(self.host_timesteps, timestep, batch)
        self._grids = [self._sparse_grid(grid, min(1.0, max(0.0, 1.0 - t / n))) for t in values]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Same arguments (positional or keyword) and outputs as the base model's forward. Call the
        model (``model(...)``), not ``model.forward(...)``: the pre-hook `_decide` takes the density."""
        bound = self._base_signature.bind(self, hidden_states, *args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        del inputs["self"]
        return_dict = inputs.pop("return_dict")
        grids, self._grids = self._grids, None  # one decision per call
        if grids is None:
            raise RuntimeError("FlexDiT's forward ran without its pre-hook: call the model, not .forward")
        batch = hidden_states.shape[0]
        grid = (hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size)
        if len(set(grids)) == 1:
            output = self._forward(inputs, grid, grids[0])
        else:  # mixed timesteps with different densities: one pass per density, same order back
            output = torch.empty(0)
            for g in sorted(set(grids)):
                idx = torch.tensor([i for i, gi in enumerate(grids) if gi == g], device=hidden_states.device)
                part = self._forward({k: _index_batch(v, idx, batch) for k, v in inputs.items()}, grid, g)
                if output.numel() == 0:
                    output = part.new_empty((batch, *part.shape[1:]))
                output[idx] = part
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def _forward(
        self, inputs: dict[str, Any], grid: tuple[int, int], sparse_grid: tuple[int, int]
    ) -> torch.Tensor:
        x, cond, out_cond = self._embed(inputs)
        for block in self.pooling_blocks:
            x = self._run(block, x, cond)
        for module in self.sdt_modules:
            x = module(x, grid, sparse_grid, cond, self._run)
        for block in self.dense_blocks:
            x = self._run(_run_dense, block, x, cond)
        return self._unpatchify(self._output(x, out_cond), grid)

    def _embed(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, _Cond, Any]:
        """Patch embedding and conditioning, as the base model's forward computes them."""
        hidden_states = inputs["hidden_states"]
        if self.base_class == "DiTTransformer2DModel":
            cond = _Cond(
                inputs["timestep"], inputs["class_labels"], None, None, inputs["cross_attention_kwargs"]
            )
            return self.pos_embed(hidden_states), cond, cond
        batch = hidden_states.shape[0]
        if self.use_additional_conditions and inputs["added_cond_kwargs"] is None:
            raise ValueError(
                "`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`."
            )
        mask = inputs["encoder_attention_mask"]
        if mask is not None and mask.ndim == 2:  # keep/discard mask -> additive bias, as the base model does
            mask = ((1 - mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        x = self.pos_embed(hidden_states)
        timestep, embedded_timestep = self.adaln_single(
            inputs["timestep"], inputs["added_cond_kwargs"], batch_size=batch, hidden_dtype=x.dtype
        )
        text = inputs["encoder_hidden_states"]
        if self.caption_projection is not None:
            text = self.caption_projection(text).view(batch, -1, x.shape[-1])
        return x, _Cond(timestep, None, text, mask, inputs["cross_attention_kwargs"]), embedded_timestep

    def _output(self, x: torch.Tensor, out_cond: Any) -> torch.Tensor:
        if self.base_class == "DiTTransformer2DModel":
            first = self.original_block_prefixes()[0]
            emb = self.get_submodule(first).norm1.emb(
                out_cond.timestep, out_cond.class_labels, hidden_dtype=x.dtype
            )
            shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
            return self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])
        shift, scale = (
            self.scale_shift_table[None] + out_cond[:, None].to(self.scale_shift_table.device)
        ).chunk(2, dim=1)
        return self.proj_out(self.norm_out(x) * (1 + scale.to(x.device)) + shift.to(x.device))

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        p = self.patch_size
        return rearrange(
            x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p, c=self.out_channels
        )


def _check_fits(flex: FlexDiTConfig, dense: ModelMixin) -> None:
    """The layout must partition the dense blocks and the sparse grid must fit the token grid."""
    num_layers = len(dit.blocks(dense))
    if flex.num_layers != num_layers:
        raise ValueError(
            f"the FlexDiT layout uses {flex.num_layers} blocks (pooling_blocks {flex.pooling_blocks} + num_modules "
            f"{flex.num_modules} x sum(module_layout) {sum(flex.module_layout)} + top_dense_blocks "
            f"{flex.top_dense_blocks}) but the model has num_layers={num_layers}; they must be equal"
        )
    side = dense.config.sample_size // dense.config.patch_size
    if flex.num_modules and (flex.sparse_grid[0] > side or flex.sparse_grid[1] > side):
        raise ValueError(
            f"sparse_grid {flex.sparse_grid} must not exceed the model's token grid ({side}, {side})"
        )
    norm_type = dit.blocks(dense)[0].norm_type if num_layers else None
    if norm_type not in ("ada_norm_zero", "ada_norm_single"):
        raise NotImplementedError(
            f"FlexDiT supports ada_norm_zero / ada_norm_single blocks, not {norm_type!r}"
        )


def convert_to_flexdit(
    transformer: ModelMixin, config: FlexDiTConfig | None = None
) -> FlexDiTTransformer2DModel:
    """A new :class:`FlexDiTTransformer2DModel` holding copies of ``transformer``'s weights.

    A *conversion*, not a patch: it returns a different model (new modules, new parameters) and
    leaves ``transformer`` as it was, so there is no handle and nothing to remove; use the
    returned model in place of the dense one (e.g. ``pipe.transformer = convert_to_flexdit(...)``).
    ``config=None`` means ``FlexDiTConfig()`` (the paper's DiT-XL/2 layout).

    The dense blocks are reused in order (Poolingformer blocks drop their query/key
    projections); the recovery merge layers start at identity/zero (``config.merge_init``).
    ``transformer`` itself is not modified. Same device, dtype and train/eval mode.
    """
    from accelerate import init_empty_weights

    config = resolve_config(config, FlexDiTConfig)
    base_class = type(transformer).__name__
    if base_class not in dit.TRANSFORMERS:
        raise TypeError(f"transformer must be one of {sorted(dit.TRANSFORMERS)}, got {base_class}")
    _check_fits(config, transformer)
    base_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = FlexDiTTransformer2DModel(
            base_class=base_class, base_config=base_config, flexdit=config.to_dict()
        )
    source = transformer.state_dict()
    state: dict[str, torch.Tensor] = {}
    for i, prefix in enumerate(model.original_block_prefixes()):
        head = f"{dit.BLOCKS}.{i}."
        state.update({prefix + "." + k[len(head) :]: v for k, v in source.items() if k.startswith(head)})
    state.update({k: v for k, v in source.items() if not k.startswith(f"{dit.BLOCKS}.")})
    ref = next(iter(source.values()))
    for name, module in model.named_modules():
        if isinstance(module, RecoveryBlock):
            state.update({f"{name}.{k}": v.to(ref) for k, v in module.initial_merge_state().items()})
    expected = model.state_dict().keys()
    state = {k: v.detach().clone() for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(ref.device).train(transformer.training)
