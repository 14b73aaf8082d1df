"""Training-free dynamic token density for diffusion transformers (FlexDiT-style), as model hooks.

FlexDiT (Chang et al., "FlexDiT: Dynamic Token Density Control for Diffusion Transformer",
arXiv:2412.06028) spends fewer tokens in the bottom and middle blocks and at the noisiest
steps. This plugin does the same on any pretrained checkpoint without fine-tuning:

- **pooled** blocks run entirely on reduced tokens;
- **sparse** blocks run on reduced queries attending to dense keys/values (``"sparse_q"``) or
  on dense queries attending to reduced keys/values (``"sparse_kv"``);
- the other (top) blocks stay dense.

The residual stream always stays at full resolution: a reduced block's update
``block(reduce(x)) - reduce(x)`` is expanded back and added to ``x``. Tokens are reduced by
average pooling over (frames, height, width) windows or by ToMe bipartite merging on grid
cells (`mmaccel.diffusion.token_reduce`). A `mmaccel.runtime.budget` density schedule over denoising progress sets the keep ratio of
each forward; keep ratio 1 runs the original blocks untouched. Progress follows the one timestep
convention (`mmaccel.runtime.timesteps`): ``current_timestep_callback`` returns the scheduler's
timestep (``lambda: pipe.current_timestep``), without it the transformer's own ``timestep``
argument is read, and progress is ``1 - t / num_train_timesteps``. Supported (the model tables
of `mmaccel.runtime.adapters`): ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
``WanTransformer3DModel`` (RoPE reduced with the tokens; Wan 2.2 included, a pipeline's two
experts through `mmaccel.runtime.pipelines`), ``CogVideoXTransformer3DModel``,
``HunyuanVideoTransformer3DModel`` and ``FluxTransformer2DModel`` (the last three pooled blocks
only; their dual- and single-stream blocks count as one stack, the text stream is not reduced).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch.utils import flop_counter

from mmaccel.diffusion.token_density_export import PlanChoice, plan_starts, progress_tensor
from mmaccel.diffusion.token_reduce import (
    BipartiteMerge,
    Grid,
    GridPool,
    check_divides,
    merge_positions,
    pool_factors_at_most,
)
from mmaccel.runtime.adapters import cogvideox, dit, flux, hunyuan_video, wan
from mmaccel.runtime.budget import ConstantSchedule, DensitySchedule, StepSchedule, monotone_pieces
from mmaccel.runtime.checkpointing import checkpointing_with_gradients
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats
from mmaccel.runtime.timesteps import HostTimesteps, check_timestep_callback, read_timestep, timestep_progress

__all__ = [
    "TokenDensityConfig",
    "TokenDensityHandle",
    "TokenDensityStats",
    "DensityStep",
    "apply_token_density",
    "count_flops",
]

_HOOK = "mmaccel_token_density"
_REDUCERS = ("pool", "merge")
_SPARSE_MODES = ("sparse_q", "sparse_kv")
_EXPAND = ("nearest", "linear")
Segment = tuple[int, int]


def _check_segment(name: str, value: object) -> None:
    if value is None or value == "auto":
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be 'auto', None or a (start, stop) tuple of ints, got {value!r}")
    start, stop = value
    if not 0 <= start < stop:
        raise ValueError(f"{name} must satisfy 0 <= start < stop, got {value!r}")


@dataclass(frozen=True)
class TokenDensityConfig:
    """Where, when and how tokens are reduced.

    Args:
        reducer: ``"pool"`` (average pooling over ``factor`` windows) or ``"merge"`` (ToMe
            bipartite matching, one destination per ``factor`` cell).
        factor: window / cell per axis, ``(h, w)`` or ``(frames, h, w)``; ints >= 1 that must
            divide the token grid. At keep ratio ``r`` pooling uses the divisor window of
            ``factor`` whose keep ratio is nearest to ``r`` (in log scale, ties to denser);
            merging keeps ``max(round(r * N), N / prod(factor))`` tokens.
        pooled_blocks: block range ``(start, stop)`` run on reduced tokens, ``None`` for none,
            ``"auto"`` for FlexDiT's layout (bottom 2/28 of the depth, at least one block).
        sparse_blocks: block range run sparse-dense, ``None`` or ``"auto"`` (from the end of the
            pooled blocks to the top 4/28 of the depth, which stay dense).
        sparse_mode: ``"sparse_q"`` (reduced queries, dense keys/values) or ``"sparse_kv"``.
        expand: how a pooled update returns to the grid: ``"nearest"`` or ``"linear"``.
        schedule: denoising progress in [0, 1] -> keep ratio in (0, 1] (`mmaccel.runtime.budget`).
        num_train_timesteps: ``progress = 1 - t / num_train_timesteps``.
        merge_seed: seed of the random destination per cell (re-seeded each forward), or
            ``None`` for the first token of each cell.
        count_flops: count the FLOPs of each forward (slower) into the stats.
    """

    reducer: str = "pool"
    factor: tuple[int, ...] = (2, 2)
    pooled_blocks: Segment | str | None = "auto"
    sparse_blocks: Segment | str | None = "auto"
    sparse_mode: str = "sparse_q"
    expand: str = "nearest"
    schedule: DensitySchedule = field(
        default_factory=lambda: StepSchedule(boundaries=(0.8,), ratios=(0.25, 1.0))
    )
    num_train_timesteps: int = 1000
    merge_seed: int | None = 0
    count_flops: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("reducer", self.reducer, _REDUCERS),
            ("sparse_mode", self.sparse_mode, _SPARSE_MODES),
            ("expand", self.expand, _EXPAND),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.reducer == "merge" and self.expand != "nearest":
            raise ValueError(
                "expand applies to reducer='pool' only; merged tokens expand by copying (nearest)"
            )
        if (
            not isinstance(self.factor, tuple)
            or len(self.factor) not in (2, 3)
            or not all(isinstance(f, int) and not isinstance(f, bool) for f in self.factor)
        ):
            raise TypeError(
                f"factor must be a tuple of 2 or 3 ints ((h, w) or (frames, h, w)), got {self.factor!r}"
            )
        if min(self.factor) < 1:
            raise ValueError(f"factor entries must be >= 1, got {self.factor!r}")
        _check_segment("pooled_blocks", self.pooled_blocks)
        _check_segment("sparse_blocks", self.sparse_blocks)
        p, s = self.pooled_blocks, self.sparse_blocks
        if isinstance(p, tuple) and isinstance(s, tuple) and p[0] < s[1] and s[0] < p[1]:
            raise ValueError(f"pooled_blocks {p} and sparse_blocks {s} overlap")
        if not callable(self.schedule):
            raise TypeError("schedule must be callable: progress in [0, 1] -> keep ratio in (0, 1]")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise TypeError("num_train_timesteps must be an int >= 1")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.merge_seed is not None and (not isinstance(self.merge_seed, int) or self.merge_seed < 0):
            raise ValueError(f"merge_seed must be None or an int >= 0, got {self.merge_seed!r}")

    @property
    def factor3(self) -> Grid:
        return self.factor if len(self.factor) == 3 else (1, *self.factor)  # type: ignore[return-value]

    def layout(self, depth: int) -> tuple[range, range]:
        """The (pooled, sparse) block ranges for a model with ``depth`` blocks."""
        p, s = self.pooled_blocks, self.sparse_blocks
        if "auto" in (p, s) and depth < 3:
            raise ValueError(f"'auto' segments need at least 3 blocks, the model has {depth}; give ranges")
        n_pooled = max(1, round(2 * depth / 28))
        n_top = max(1, round(4 * depth / 28))
        pooled = range(0, n_pooled) if p == "auto" else range(*p) if p else range(0)
        sparse_start = pooled.stop if p is not None else 0
        sparse = (
            range(sparse_start, max(sparse_start, depth - n_top))
            if s == "auto"
            else range(*s)
            if s
            else range(0)
        )
        for name, seg in (("pooled_blocks", pooled), ("sparse_blocks", sparse)):
            if seg and seg.stop > depth:
                raise ValueError(
                    f"{name} {(seg.start, seg.stop)} is out of range for a model with {depth} blocks"
                )
        if set(pooled) & set(sparse):
            raise ValueError(f"pooled blocks {pooled} and sparse blocks {sparse} overlap")
        return pooled, sparse


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------


@dataclass
class DensityStep:
    """One transformer forward: progress, scheduled and realised density, tokens per block.

    ``block_tokens[i] = (query_tokens, key_value_tokens)`` of block ``i``'s self-attention.
    ``setting`` is the pooling window ``(f, h, w)`` or the number of merged tokens. ``progress``
    is None under a `ConstantSchedule` whose timestep is a tensor: the decision does not need
    it, so it is not read (a number, or a view of the ``scheduler``'s timesteps, is recorded).
    """

    progress: float | None
    keep_ratio: float
    setting: Grid | int | None
    dense_tokens: int
    block_tokens: list[tuple[int, int]]
    flops: int | None = None

    @property
    def reduced(self) -> bool:
        """Whether any block ran on fewer query or key/value tokens than the dense count."""
        return any(b != (self.dense_tokens, self.dense_tokens) for b in self.block_tokens)

    @property
    def token_ratio(self) -> float:
        """Query tokens processed by all blocks over the dense count."""
        return sum(q for q, _ in self.block_tokens) / (self.dense_tokens * len(self.block_tokens))


class TokenDensityStats(Stats):
    """Per-forward records of an applied `TokenDensityConfig` (``handle.stats``): ``steps`` holds
    one `DensityStep` per transformer forward; ``summary()`` condenses them, ``table()`` lists them."""

    def __init__(self) -> None:
        self.steps: list[DensityStep] = []

    def reset(self) -> None:
        self.steps.clear()

    @property
    def token_ratio(self) -> float:
        """Mean over forwards of `DensityStep.token_ratio`."""
        if not self.steps:
            raise ValueError("no forward recorded yet")
        return sum(s.token_ratio for s in self.steps) / len(self.steps)

    @property
    def total_flops(self) -> int:
        if not self.steps or any(s.flops is None for s in self.steps):
            raise ValueError("FLOPs were not counted; apply with TokenDensityConfig(count_flops=True)")
        return sum(s.flops for s in self.steps)  # type: ignore[misc]

    def summary(self) -> dict[str, int | float | None]:
        """Forwards recorded, how many ran reduced, mean keep ratio and token ratio (query tokens
        over the dense count), total GFLOPs (None unless ``count_flops``); None where no forward ran."""
        n = len(self.steps)
        counted = n > 0 and all(s.flops is not None for s in self.steps)
        return {
            "forwards": n,
            "reduced_forwards": sum(s.token_ratio < 1.0 for s in self.steps),
            "keep_ratio": sum(s.keep_ratio for s in self.steps) / n if n else None,
            "token_ratio": self.token_ratio if n else None,
            "gflops": self.total_flops / 1e9 if counted else None,
        }

    def table(self) -> str:
        """A markdown table, one row per forward."""
        rows = [
            "| forward | progress | keep ratio | setting | token ratio | GFLOPs |",
            "|---|---|---|---|---|---|",
        ]
        for i, s in enumerate(self.steps):
            gflops = "-" if s.flops is None else f"{s.flops / 1e9:.2f}"
            progress = "-" if s.progress is None else f"{s.progress:.3f}"
            rows.append(
                f"| {i} | {progress} | {s.keep_ratio:.3f} | {s.setting} | {s.token_ratio:.3f} | {gflops} |"
            )
        return "\n".join(rows)


def _cpu_sdpa_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under ``torch.utils.flop_counter.FlopCounterMode``; returns (result, FLOPs).

    Adds the formula for CPU flash attention, which torch does not count by itself.
    """
    with _flop_counter() as counter:
        out = fn()
    return out, counter.get_total_flops()


def _flop_counter() -> flop_counter.FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU flash attention."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)


# ------------------------------------------------------------------------------------------
# Model families
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    blocks_attr: str
    hidden: str = "hidden_states"
    rotary: str | tuple[str, ...] | None = None  # block argument(s) holding (cos, sin)
    rotary_token_dim: int = 1  # token dim of cos/sin ((1, N, 1, D) for Wan, (N, D) for CogVideoX)
    temb: str | None = None  # block argument that may be per-token (Wan 2.2)
    tuple_output: bool = False
    sparse_ok: bool = True
    block_list: Callable[[torch.nn.Module], list[torch.nn.Module]] | None = None  # dual + single stream
    output_index: int = 0  # where the image/video tokens are in a tuple output (Flux: 1)
    rotary_text_arg: str | None = None  # the RoPE's first rows are this argument's tokens (Flux: text)
    mask_arg: str | None = None  # joint key mask, image/video tokens first (HunyuanVideo)
    grid_args: tuple[str, ...] = ()  # more transformer arguments the token grid needs (Flux: img_ids)


# What token density needs per family; the supported classes come from the adapters' tables.
_ADAPTERS = {
    dit: _Family(dit.BLOCKS),
    wan: _Family(wan.BLOCKS, rotary=wan.ROTARY_ARG, temb=wan.TEMB_ARG),
    cogvideox: _Family(
        cogvideox.BLOCKS, rotary=cogvideox.ROTARY_ARG, rotary_token_dim=0, tuple_output=True, sparse_ok=False
    ),
    hunyuan_video: _Family(
        hunyuan_video.DUAL_BLOCKS, rotary=hunyuan_video.ROTARY_ARGS, rotary_token_dim=0, tuple_output=True,
        sparse_ok=False, block_list=hunyuan_video.blocks, mask_arg=hunyuan_video.MASK_ARG,
    ),
    flux: _Family(
        flux.DUAL_BLOCKS, rotary=flux.ROTARY_ARG, rotary_token_dim=0, tuple_output=True, sparse_ok=False,
        block_list=flux.blocks, output_index=flux.OUTPUT_INDEX, rotary_text_arg=flux.TEXT_ARG, grid_args=("img_ids",),
    ),
}
_FAMILIES = {name: family for adapter, family in _ADAPTERS.items() for name in adapter.TRANSFORMERS}
_GRIDS = {name: adapter.token_grid for adapter in _ADAPTERS for name in adapter.TRANSFORMERS}


_TOKEN_COUNTS = {name: adapter.token_count for adapter in _ADAPTERS if hasattr(adapter, "token_count")
                 for name in adapter.TRANSFORMERS}  # fmt: skip


def _token_grid(model: torch.nn.Module, arguments: dict[str, Any]) -> Grid:
    """(frames, height, width) of the transformer's image/video tokens for this forward's arguments."""
    name = type(model).__name__
    grid_args = _FAMILIES[name].grid_args
    if grid_args and torch.compiler.is_exporting():
        raise NotImplementedError(
            f"torch.export of token density on {name} below keep 1 is not implemented: the token grid is "
            f"read from the values of {', '.join(grid_args)} on the host. Export it at keep 1, or compile it instead"
        )
    extra = (arguments[a] for a in grid_args)
    return _GRIDS[name](model, arguments["hidden_states"], *extra)


def _token_count(model: torch.nn.Module, arguments: dict[str, Any]) -> int:
    """The image/video token count of a dense forward: from ``hidden_states`` where the family's
    grid comes from position ids (Flux: any ids, e.g. diffusers' random test ids), else the grid's."""
    count = _TOKEN_COUNTS.get(type(model).__name__)
    return count(arguments["hidden_states"]) if count is not None else math.prod(_token_grid(model, arguments))


# ------------------------------------------------------------------------------------------
# Per-forward plan and hooks
# ------------------------------------------------------------------------------------------


def _setting(config: TokenDensityConfig, n: int, keep: float) -> Grid | int:
    """The reduction at keep ratio ``keep`` of ``n`` tokens: the pooling window whose keep ratio is
    nearest in log scale (ties to the denser), or the number of tokens merged away."""
    if config.reducer == "pool":
        target = math.log(keep)
        return min(
            pool_factors_at_most(config.factor3), key=lambda c: abs(-math.log(math.prod(c)) - target)
        )  # densest first, so ties go to the denser window
    cells = n // math.prod(config.factor3)
    return n - max(cells, round(keep * n))


@contextlib.contextmanager
def _host_constants() -> Iterator[None]:
    """Tensors made inside run on the host, untraced, also while ``torch.export`` traces: a plan's
    constants, which the plan's ``cond`` branches (`token_density_export`) close over as real tensors."""
    if not torch.compiler.is_exporting():
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


class _Plan:
    """What every reduced block of a transformer forward does at one grid and keep ratio.

    Plans are cached per ``(grid, setting)`` and reused, so a compiled forward sees the same
    object (no recompilation) for as long as the setting does not change.
    """

    def __init__(self, config: TokenDensityConfig, grid: Grid, keep: float) -> None:
        self.config = config
        self.grid = grid
        self.n = math.prod(grid)
        self.pool: GridPool | None = None
        self.num_merge = 0
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self.setting = _setting(config, self.n, keep)
        if config.reducer == "pool":
            if math.prod(self.setting) > 1:  # type: ignore[arg-type]
                self.pool = GridPool(grid, self.setting, config.expand)  # type: ignore[arg-type]
        else:
            self.num_merge = self.setting  # type: ignore[assignment]
            generator = None if config.merge_seed is None else torch.Generator().manual_seed(config.merge_seed)
            # re-seeded each forward, the destinations never change: draw them once per plan
            with _host_constants():  # under torch.export: constants of the program, not traced values
                self.positions = merge_positions(grid, config.factor3, generator)

    @property
    def dense(self) -> bool:
        return self.pool is None and self.num_merge == 0

    @property
    def num_tokens(self) -> int:
        """Tokens after reduction."""
        return self.pool.num_tokens if self.pool is not None else self.n - self.num_merge

    def reducer(self, x: torch.Tensor) -> GridPool | BipartiteMerge:
        if self.pool is not None:
            return self.pool
        if self.positions[0].device != x.device:  # type: ignore[index]
            self.positions = tuple(p.to(x.device) for p in self.positions)  # type: ignore[assignment,union-attr]
        return BipartiteMerge(x, self.grid, self.config.factor3, self.num_merge, positions=self.positions)


class _Shared:
    """State shared by the hooks of one application: the forward's plan, and the route and
    companion of the block running now (blocks run one after another, so one of each suffices).

    Every hooked block reads this one object first, and nothing kind-specific while the plan is
    None: a dense forward traces identically on every hooked block (one graph under regional
    compilation, whatever the blocks' kinds).
    """

    def __init__(self) -> None:
        self.plan: _Plan | None = None
        self.choice: PlanChoice | None = None  # torch.export under a schedule that reads the timestep
        self.companion: torch.Tensor | None = None  # sparse_q: dense tokens appended to norm1's input
        self.route: _AttnRoute | None = None  # how the running block's self-attention mixes tokens
        self.concat = self._concat  # one bound method: the same hook object on every hooked norm1

    def _concat(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """sparse_q's forward pre-hook on norm1: normalise (and modulate) [reduced; dense] in one call."""
        dense = self.companion
        if dense is None:
            return None
        self.companion = None
        x = args[0]
        return (torch.cat([x, dense.to(x.dtype)], dim=1), *args[1:])


class _Planner:
    """The host side of each transformer forward, as torch hooks on the transformer.

    `before` (a forward pre-hook) reads the timestep, evaluates the schedule, picks the plan and
    records the step; `after` (a forward hook with ``always_call``) finishes the record. Both are
    ``torch.compiler.disable``d and run outside the forward that ``torch.compile(transformer,
    fullgraph=True)`` traces, so the compiled region only reads the plan (dynamo guards on which
    plan it is: one graph per plan).

    The plan stays set after the forward, until the next one's `before`: a block that gradient
    checkpointing recomputes in backward takes its forward's plan. Where several checkpointed
    forwards share one backward, `after` hooks the forward's output so that its backward sets the
    plan of that forward again before its blocks recompute (the engine runs the later forward's
    nodes first, so the earlier one's blocks see their own plan).
    """

    def __init__(
        self,
        config: TokenDensityConfig,
        shared: _Shared,
        stats: TokenDensityStats,
        layout: tuple[range, range],
        depth: int,
        signature: inspect.Signature,
        timestep_callback: Callable[[], Any] | None,
        host: HostTimesteps | None,
    ) -> None:
        self.config, self.shared, self.stats, self.depth = config, shared, stats, depth
        self.pooled, self.sparse = layout
        self.signature, self.timestep_callback, self.host = signature, timestep_callback, host
        self.plans: dict[tuple[Grid, Grid | int], _Plan] = {}
        self.by_keep: dict[tuple[Grid, float], _Plan] = {}
        self.step: DensityStep | None = None  # the record of the forward running now
        self.counter: flop_counter.FlopCounterMode | None = None

    def _progress(self, bound: inspect.BoundArguments) -> float | None:
        """This forward's denoising progress. Under a `ConstantSchedule` the keep ratio does not
        depend on it: a timestep tensor is not read there (no device read, and ``torch.export``
        can trace the forward), None is returned; a host value (a number, or a view of the
        scheduler's timesteps) is still validated and returned."""
        n = self.config.num_train_timesteps
        if self.timestep_callback is not None:
            value, source = self.timestep_callback(), "current_timestep_callback"
        else:
            value, source = bound.arguments.get("timestep"), "the transformer's timestep argument"
        constant = isinstance(self.config.schedule, ConstantSchedule)
        found = self.host.lookup(value) if self.host is not None and value is not None else None
        if found is None and isinstance(value, torch.Tensor) and constant:
            return None
        t = read_timestep(value if found is None else found, n, source=source)
        return timestep_progress(t, n)

    def _export(self, module: torch.nn.Module, bound: inspect.BoundArguments) -> None:
        """``torch.export`` under a schedule that reads the timestep: the plan of every progress
        interval, selected in the traced forward from the timestep input (`token_density_export`)."""
        schedule = self.config.schedule
        if self.timestep_callback is not None:
            raise NotImplementedError(
                "torch.export of token density under a schedule that reads the timestep takes it from the "
                "transformer's timestep argument, an input of the exported program: a current_timestep_callback's "
                "value would be fixed at export time. Apply token density without the callback to export"
            )
        try:
            pieces = monotone_pieces(schedule)
        except TypeError:
            raise NotImplementedError(
                f"torch.export of token density under a {type(schedule).__name__} is not implemented: the exported "
                "program selects its plan exactly under a ConstantSchedule, LinearSchedule or StepSchedule only. "
                "Use one of these, or compile with torch.compile instead"
            ) from None
        source = "the transformer's timestep argument"
        progress = progress_tensor(bound.arguments.get("timestep"), self.config.num_train_timesteps, source)
        n = _token_count(module, bound.arguments)
        starts = plan_starts(lambda p: _setting(self.config, n, float(schedule(p))), pieces)
        plans = tuple(self._plan_at(module, bound, float(schedule(s))) for s in starts)
        if len(plans) == 1:
            self.shared.plan = plans[0]
        else:
            self.shared.choice = PlanChoice.build(progress, starts, plans)

    def _plan_at(self, module: torch.nn.Module, bound: inspect.BoundArguments, keep: float) -> _Plan | None:
        """The plan at keep ratio ``keep`` (None: dense), as `before` picks it."""
        if keep == 1.0:
            return None
        grid = _token_grid(module, bound.arguments)
        check_divides(self.config.factor3, grid, "factor")
        plan = self._plan(grid, keep)
        return None if plan.dense else plan

    def _plan(self, grid: Grid, keep: float) -> _Plan:
        plan = self.by_keep.get((grid, keep))
        if plan is None:  # built once per (grid, keep ratio): no per-forward tensors
            plan = _Plan(self.config, grid, keep)
            plan = self.by_keep[grid, keep] = self.plans.setdefault((grid, plan.setting), plan)
        return plan

    def _block_tokens(self, plan: _Plan) -> list[tuple[int, int]]:
        n, m = plan.n, plan.num_tokens
        if plan.dense:
            return [(n, n)] * self.depth
        sparse = (m, n) if self.config.sparse_mode == "sparse_q" else (n, m)
        return [(m, m) if i in self.pooled else sparse if i in self.sparse else (n, n) for i in range(self.depth)]

    @torch.compiler.disable
    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (``with_kwargs=True``): this forward's plan and record."""
        self.shared.plan, self.shared.choice, self.step = None, None, None
        bound = self.signature.bind(*args, **kwargs)
        if torch.compiler.is_exporting() and not isinstance(self.config.schedule, ConstantSchedule):
            self._export(module, bound)  # export traces the forward once, it runs no forward: no record
            return
        progress = self._progress(bound)
        schedule = self.config.schedule
        keep = float(schedule.ratio if progress is None else schedule(progress))  # None: a ConstantSchedule
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"schedule returned keep ratio {keep!r} at progress {progress}; it must be in (0, 1]")
        if keep == 1.0:  # dense: no token layout needed (the setting a plan at keep 1 has)
            n = _token_count(module, bound.arguments)
            setting: Grid | int = (1, 1, 1) if self.config.reducer == "pool" else 0
            step = DensityStep(progress, keep, setting, n, [(n, n)] * self.depth)
        else:
            grid = _token_grid(module, bound.arguments)
            check_divides(self.config.factor3, grid, "factor")
            plan = self._plan(grid, keep)
            self.shared.plan = None if plan.dense else plan
            step = DensityStep(progress, keep, plan.setting, plan.n, self._block_tokens(plan))
        if torch.compiler.is_exporting():  # export traces the forward once, it runs no forward: no record
            return
        self.step = step
        self.stats.steps.append(step)
        if self.config.count_flops:  # eager only: the forward runs under a dispatch mode
            self.counter = _flop_counter()
            self.counter.__enter__()

    @torch.compiler.disable
    def after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Forward hook (``always_call=True``; ``output`` is None when the forward or `before`
        raised): FLOPs, and the checkpointed backward's plan; a failed forward is not recorded."""
        step, self.step = self.step, None
        self.shared.choice = None  # an export's selection ends with its trace
        counter, self.counter = self.counter, None
        if counter is not None:
            counter.__exit__(None, None, None)
        if output is None:
            self.shared.plan = None
            if step is not None:
                self.stats.steps.remove(step)
            return
        if counter is not None:
            step.flops = counter.get_total_flops()  # type: ignore[union-attr]
        if checkpointing_with_gradients(module):
            out = _first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(_RestorePlan(self.shared, self.shared.plan))


class _RestorePlan:
    """A gradient hook on a checkpointed forward's output: its backward recomputes with its plan."""

    def __init__(self, shared: _Shared, plan: _Plan | None) -> None:
        self.shared, self.plan = shared, plan

    def __call__(self, grad: torch.Tensor) -> None:
        self.shared.plan = self.plan


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The sample tensor of a transformer's output (a tuple or diffusers' ``BaseOutput``)."""
    if isinstance(output, dict):
        output = tuple(output.values())
    values = output if isinstance(output, tuple) else (output,)
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


@dataclass
class _AttnRoute:
    """How the next self-attention call of a block mixes reduced and dense tokens."""

    mode: str
    n_query: int = 0  # sparse_q: the first n_query tokens of the input are the queries
    kv_in: torch.Tensor | None = None  # sparse_q with per-token modulation: the dense keys/values input
    reducer: GridPool | BipartiteMerge | None = None  # sparse_kv: reduces the keys/values
    rope_q: tuple[torch.Tensor, torch.Tensor] | None = None
    rope_k: tuple[torch.Tensor, torch.Tensor] | None = None
    used: bool = False


class _Kind:
    """What the hooked blocks of one kind (pooled, sparse_q or sparse_kv, per block class) share.

    One object per kind, holding no block index: every block of a kind shows dynamo the same
    objects, so regional compilation (`compile_repeated_blocks`) compiles one graph per kind on a
    reducing forward. Its hook reads it only there (`_BlockHook.new_forward`).
    """

    def __init__(self, kind: str, family: _Family, shared: _Shared, signature: inspect.Signature) -> None:
        self.kind, self.family, self.shared, self.signature = kind, family, shared, signature


class _BlockHook(ModelHook):
    """Reduce before a block, expand its update after (pooled / sparse_q), or route attention."""

    def __init__(self, kind: _Kind) -> None:
        super().__init__()
        self.shared, self.state = kind.shared, kind

    def _reduce_rotary(
        self, reducer: GridPool | BipartiteMerge, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope
        if self.state.family.rotary_token_dim == 0:
            if isinstance(reducer, BipartiteMerge):
                raise NotImplementedError("token merging with CogVideoX rotary embeddings is not implemented")
            cos, sin = reducer.reduce_rotary(cos[None], sin[None])
            return cos[0], sin[0]
        return reducer.reduce_rotary(cos, sin)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        choice = self.shared.choice
        if choice is not None:  # torch.export under a schedule that reads the timestep: cond over the plans
            return choice.run(module, lambda plan, a, k: self._forward(module, plan, a, k), args, kwargs)
        return self._forward(module, self.shared.plan, args, kwargs)

    def _forward(self, module: torch.nn.Module, plan: _Plan | None, args: tuple, kwargs: dict) -> Any:
        """The block's forward under ``plan`` (None: the original block, untouched)."""
        original = self.fn_ref.original_forward
        if plan is None:  # dense: nothing kind-specific read, every hooked block traces alike
            return original(*args, **kwargs)
        state, shared = self.state, self.shared
        fam, kind = state.family, state.kind
        bound = state.signature.bind(*args, **kwargs)
        x = bound.arguments[fam.hidden]
        if x.shape[1] != plan.n:
            raise ValueError(f"a {kind} block got {x.shape[1]} tokens, the grid {plan.grid} has {plan.n}")
        mask = bound.arguments.get(fam.mask_arg or "attention_mask")
        if mask is not None and fam.mask_arg is None:
            raise NotImplementedError("token density with a self-attention mask is not implemented")
        reducer = plan.reducer(x)
        m = reducer.num_tokens
        names = (fam.rotary,) if isinstance(fam.rotary, str) else fam.rotary or ()
        rotary = next((n for n in names if n in bound.arguments), None)
        rope = bound.arguments.get(rotary) if rotary else None
        rope_r = self._reduce_rotary(reducer, rope) if rope is not None and not fam.rotary_text_arg else None
        if rope is not None and fam.rotary_text_arg:  # text rows first (Flux): reduce the image rows only
            k = bound.arguments[fam.rotary_text_arg].shape[1]
            image = self._reduce_rotary(reducer, tuple(r[k:] for r in rope))
            rope_r = tuple(torch.cat([r[:k], i]) for r, i in zip(rope, image))
        if mask is not None:  # video keys first and never masked: drop n - m of them
            bound.arguments[fam.mask_arg] = mask[..., plan.n - m :]

        if kind == "sparse_kv":
            shared.route = _AttnRoute("sparse_kv", reducer=reducer, rope_q=rope, rope_k=rope_r)
            try:
                out = original(*bound.args, **bound.kwargs)
                self._check_routed()
            finally:
                shared.route = None
            return out

        x_r = reducer.reduce(x)
        bound.arguments[fam.hidden] = x_r
        first = bound.arguments.get(hunyuan_video.FIRST_FRAME_ARG)
        if isinstance(first, int) and isinstance(reducer, GridPool):  # pooled within frames (apply checks)
            bound.arguments[hunyuan_video.FIRST_FRAME_ARG] = first // math.prod(reducer.factor)
        temb = bound.arguments[fam.temb] if fam.temb is not None else None
        per_token = temb is not None and temb.ndim == 4  # (B, N, 6, C): Wan 2.2's per-token modulation
        if per_token:  # the reduced rows take the modulation pooled like their tokens
            bound.arguments[fam.temb] = reducer.reduce(temb.flatten(2)).unflatten(2, temb.shape[2:])
        if kind == "pooled":
            if rope is not None:
                bound.arguments[rotary] = rope_r
            out = original(*bound.args, **bound.kwargs)
        else:  # sparse_q: attention takes queries from the reduced tokens, keys/values from the dense ones
            if per_token:  # the dense rows keep their own modulation: norm1 runs on them here
                kv_in = _wan_modulated_norm1(module, x, temb)
                shared.route = _AttnRoute("sparse_q", kv_in=kv_in, rope_q=rope_r, rope_k=rope)
            else:  # norm1 sees [reduced; dense] in one call
                shared.companion = x
                shared.route = _AttnRoute("sparse_q", n_query=m, rope_q=rope_r, rope_k=rope)
            try:
                out = original(*bound.args, **bound.kwargs)
                if shared.companion is not None:
                    raise RuntimeError("a sparse_q block did not call norm1, cannot run sparse_q")
                self._check_routed()
            finally:
                shared.companion = None
                shared.route = None
        i = fam.output_index
        y = out[i] if fam.tuple_output else out
        x_new = reducer.add_expanded(x, y - x_r)
        return (*out[:i], x_new, *out[i + 1 :]) if fam.tuple_output else x_new

    def _check_routed(self) -> None:
        if not self.shared.route.used:  # type: ignore[union-attr]
            raise RuntimeError(f"a {self.state.kind} block did not call its self-attention (attn1)")


def _wan_modulated_norm1(block: torch.nn.Module, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """``WanTransformerBlock``'s modulated norm1 of ``x`` under a per-token ``temb`` (B, N, 6, C),
    as its forward computes it (diffusers' Wan 2.2 TI2V branch)."""
    shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
    return (block.norm1(x.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x)


class _RoutedAttention(torch.nn.Module):
    """A hooked block's self-attention (``attn1``), its class swapped for a subclass of its own
    that follows the running sparse block's route: queries and keys/values from different token
    sets. Without a route (a dense forward, a pooled block) it is the original ``forward``.

    A class, not a per-module hook: every routed ``attn1`` shows dynamo the same ``forward``,
    where a hook's per-module function would be guarded by identity (one graph per block under
    regional compilation). Where an application has sparse blocks, the pooled blocks' ``attn1``
    is routed too, so that a dense forward traces alike on both kinds. `_routed_class` makes one
    subclass per attention class.
    """

    _mmaccel_token_density: _Shared  # set on each instance

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self._mmaccel_token_density.route
        forward = super().forward
        if route is None:
            return forward(*args, **kwargs)
        route.used = True
        h = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:]
        if route.mode == "sparse_kv":
            q_in, kv_in = h, route.reducer.reduce(h)  # type: ignore[union-attr]
        elif route.kv_in is not None:
            q_in, kv_in = h, route.kv_in
        else:
            q_in, kv_in = h[:, : route.n_query], h[:, route.n_query :]
        if isinstance(self, _WanAttention):
            return _wan_attention(self, q_in, kv_in, route.rope_q, route.rope_k)
        if route.rope_q is not None:
            raise NotImplementedError(f"sparse attention with rotary embeddings on {type(self).__name__}")
        if args or kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError(
                "sparse attention expects a self-attention call (no encoder_hidden_states)"
            )
        kwargs["encoder_hidden_states"] = kv_in
        return dit.split_attention(self, forward, q_in, **kwargs)  # fused or not


class _WanAttention:
    """Marks the routed subclass of ``WanAttention`` (its own projections and RoPE per token set)."""


_ROUTED: dict[type, type] = {}


def _routed_class(cls: type) -> type:
    """The `_RoutedAttention` subclass of attention class ``cls`` (one per class, same name)."""
    routed = _ROUTED.get(cls)
    if routed is None:
        wan_marker = (_WanAttention,) if cls.__name__ == "WanAttention" else ()
        namespace = {"__module__": __name__, "__qualname__": cls.__qualname__}
        routed = _ROUTED[cls] = type(cls.__name__, (_RoutedAttention, *wan_marker, cls), namespace)
    return routed


def _route_attention(handle: PatchHandle, attention: torch.nn.Module, shared: _Shared) -> None:
    """Swap ``attention``'s class for its routed subclass; ``handle.remove()`` swaps it back."""
    base = type(attention)
    routed = _routed_class(base)
    handle.set_attr(attention, "_mmaccel_token_density", shared)
    attention.__class__ = routed

    def undo() -> None:
        if type(attention) is routed:
            attention.__class__ = base

    handle.on_remove(undo)


def _wan_attention(
    attn: torch.nn.Module,
    q_in: torch.Tensor,
    kv_in: torch.Tensor,
    rope_q: tuple[torch.Tensor, torch.Tensor] | None,
    rope_k: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``WanAttnProcessor``'s self-attention with separate query and key/value tokens and RoPE."""
    query, key, value = wan.project_qkv(attn, q_in, kv_in, rope_q, rope_k)
    return wan.project_out(attn, wan.attention(attn, query, key, value), query)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


class TokenDensityHandle(PatchHandle):
    """What `apply_token_density` returns: the undo log plus ``stats`` (`TokenDensityStats`)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.stats = TokenDensityStats()


def apply_token_density(
    transformer: torch.nn.Module,
    config: TokenDensityConfig | None = None,
    current_timestep_callback: Callable[[], Any] | None = None,
    *,
    scheduler: Any = None,
) -> TokenDensityHandle:
    """Install training-free token density on a diffusers transformer instance.

    ``config=None`` means ``TokenDensityConfig()``. ``current_timestep_callback`` returns the
    scheduler's timestep of the step being computed (``lambda: pipe.current_timestep``); without
    it the transformer's own ``timestep`` argument is read. A value that is not a timestep in
    ``[0, config.num_train_timesteps]`` (None, NaN, negative, too large) raises ``ValueError`` at
    that forward; under a `ConstantSchedule` a timestep tensor is not read (nothing depends on it),
    which also lets ``torch.export`` trace the model; under a `LinearSchedule` or `StepSchedule` the
    exported program selects each block's plan from its timestep input
    (`mmaccel.diffusion.token_density_export`; any other schedule: ``NotImplementedError``). With
    ``scheduler`` (the pipeline's), a timestep tensor that is a view of ``scheduler.timesteps`` (what diffusers pipelines pass) is read on the host without a device
    read (`mmaccel.runtime.timesteps.HostTimesteps`). Returns a `TokenDensityHandle` whose ``stats`` records every forward;
    ``.remove()`` restores the model bit-for-bit.
    """
    from mmaccel.runtime.pipelines import apply_to_pipeline, is_pipeline, timestep_callback

    if is_pipeline(transformer):  # every transformer of the pipeline (Wan 2.2: both experts), one handle
        return apply_to_pipeline(transformer, apply_token_density, TokenDensityHandle, "token_density", config,
                                 current_timestep_callback=timestep_callback(transformer, current_timestep_callback),
                                 scheduler=scheduler if scheduler is not None else transformer.scheduler)
    config = resolve_config(config, TokenDensityConfig)
    check_timestep_callback(current_timestep_callback)
    host = None if scheduler is None else HostTimesteps(scheduler)
    name = type(transformer).__name__
    family = _FAMILIES.get(name)
    if family is None:
        raise NotImplementedError(f"token density supports {sorted(_FAMILIES)}, not {name}")
    blocks = family.block_list(transformer) if family.block_list else getattr(transformer, family.blocks_attr)
    depth = len(blocks)
    pooled, sparse = config.layout(depth)
    if sparse and not family.sparse_ok:
        raise NotImplementedError(f"sparse blocks are not implemented for {name}; use sparse_blocks=None")
    if sparse and name in wan.TRANSFORMERS:
        wan.check_self_attention(transformer, "token density's sparse blocks")
    if name in hunyuan_video.TRANSFORMERS and hunyuan_video.first_frame_split(transformer):
        if config.reducer != "pool" or config.factor3[0] != 1:
            raise NotImplementedError(
                "token density on HunyuanVideo image-to-video (image_condition_type='token_replace') needs "
                f"pooling within frames (reducer='pool', factor (1, h, w)), got reducer={config.reducer!r}, "
                f"factor={config.factor}: the first frame's tokens keep their own modulation"
            )
    if (
        len(config.factor) == 3
        and config.factor[0] != 1
        and name in (*dit.TRANSFORMERS, *flux.TRANSFORMERS)
    ):
        raise ValueError(f"factor {config.factor} pools frames, but {name} is an image model (use (h, w))")

    _check_no_block_caches(blocks, [*pooled, *sparse])
    handle = TokenDensityHandle(transformer, "token_density")
    shared = _Shared()
    stats = handle.stats
    try:
        kinds: dict[tuple[str, type], _Kind] = {}
        for i in [*pooled, *sparse]:
            block = blocks[i]
            name = "pooled" if i in pooled else config.sparse_mode
            if (name, type(block)) not in kinds:
                kinds[name, type(block)] = _Kind(name, family, shared, inspect.signature(block.forward))
            kind = kinds[name, type(block)]
            if name != "pooled":
                _check_sparse_block(block, i)
            # pooled blocks too, so that a dense forward traces alike on every hooked block (_Shared)
            if sparse and hasattr(block, "attn1") and hasattr(block, "norm1"):
                _route_attention(handle, block.attn1, shared)
                if config.sparse_mode == "sparse_q":
                    handle.add_torch_hook(block.norm1.register_forward_pre_hook(shared.concat))
            handle.add_diffusers_hook(block, _BlockHook(kind), _HOOK)
        signature = inspect.signature(transformer.forward)
        planner = _Planner(
            config, shared, stats, (pooled, sparse), depth, signature, current_timestep_callback, host
        )
        handle.add_torch_hook(transformer.register_forward_pre_hook(planner.before, with_kwargs=True))
        handle.add_torch_hook(transformer.register_forward_hook(planner.after, always_call=True))
        # the plan outlives its forward (for checkpointing's recompute), not the handle: a block hook
        # that diffusers' remove_hook leaves in a cache's chain (its new_forward keeps calling our
        # removed layer through fn_ref.original_forward) passes through after remove()
        handle.on_remove(lambda: setattr(shared, "plan", None))
    except BaseException:
        handle.remove()
        raise
    return handle


#: diffusers hooks that see a block's parameters only, never its token count: ours may go inside them
_SHAPE_AGNOSTIC_HOOKS = frozenset(
    {"group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker", "layerwise_casting", "peft_autocast_disable"}
)


def _check_no_block_caches(blocks: torch.nn.ModuleList, indices: list[int]) -> None:
    """A block-level hook registered before ours (diffusers' FirstBlockCache, MagCache, ...)
    would run inside our reduce/expand and see the reduced tokens: its residuals would mix
    token counts. Refuse with the order that works (ours first, then the cache wraps it)."""
    for i in indices:
        registry = getattr(blocks[i], "_diffusers_hook", None)
        foreign = [n for n in getattr(registry, "_hook_order", ()) if n not in _SHAPE_AGNOSTIC_HOOKS and n != _HOOK]
        if foreign:
            raise ValueError(
                f"block {i} already carries diffusers hook(s) {foreign} (a cache such as FirstBlockCache "
                "or MagCache): apply token density first, then enable the cache "
                "(transformer.disable_cache(); apply_token_density(...); transformer.enable_cache(...))"
            )


def _check_sparse_block(block: torch.nn.Module, index: int) -> None:
    """Sparse-dense needs norm1 -> attn1 (self-attention), attn1 called through its class."""
    if not hasattr(block, "norm1") or not hasattr(block, "attn1"):
        raise NotImplementedError(f"block {index} ({type(block).__name__}) has no norm1/attn1 to route")
    if "forward" in block.attn1.__dict__:
        raise NotImplementedError(
            f"block {index}'s attn1 already carries a hook or wrapper on its forward, which would bypass "
            "token density's sparse attention: apply token density first"
        )
    if getattr(block, "pos_embed", None) is not None or getattr(block, "only_cross_attention", False):
        raise NotImplementedError(
            f"block {index}: sparse attention with per-block pos_embed or cross-only attention"
        )
