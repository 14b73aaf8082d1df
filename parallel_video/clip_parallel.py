"""Clip parallelism with dual-scope attention (Video-Infinity, Tan et al. 2024, arXiv:2406.16260).

Each rank runs the whole ``WanTransformer3DModel`` on its own contiguous clip of latent frames.
Tokens only meet in self-attention, where :class:`DualScopeAttnProcessor` lets each query of a
clip attend, in one softmax, to

* **local scope**: by default (as the reference code) the band of ``2 * padding + 1`` frames
  around the query's own frame, reaching into the neighbours through ``padding`` boundary frames
  of K/V exchanged point to point (``batch_isend_irecv``); the two video ends are padded with
  all-zero K/V frames, as in the reference. Options: the whole clip plus both halos for every
  query (``local_scope="window"``) and no keys at the video ends (``end_keys="none"``);
* **global scope**: the K/V of frames sampled from every clip at a stride and all-gathered
  (``global_sampling="clip_stride"``, the reference rule), or ``global_frames`` frames spread
  evenly over the video, each frame a key at most once (``"uniform"``).

Which frames are keys of which query is pure bookkeeping in :class:`~.plan.ClipPlan`. Both
exchanges are posted as soon as K and V exist; the query projection runs while they are in
flight. The phase bias (the reference's +10 logit toward local keys below timestep 850 and toward
global keys from 850 up) is an additive key bias. Frame positions (RoPE) are the global frame
indices. The attention pieces (q/k/v, rotary, dispatch, output) come from
:mod:`mmaccel.runtime.adapters.wan`, so ``set_attention_backend`` applies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmaccel.parallel_video.plan import END_KEYS, GLOBAL_SAMPLING, LOCAL_SCOPES, ClipPlan
from mmaccel.runtime.adapters import wan
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.distributed import CommError, CommHandle, DistContext, exchange_neighbours_async
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats
from mmaccel.runtime.timesteps import check_timestep_callback, read_timestep

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "ClipParallelConfig",
    "ClipParallelHandle",
    "ClipParallelState",
    "ClipParallelStats",
    "DualScopeAttnProcessor",
    "apply_clip_parallel",
    "offset_rope",
]

SUPPORTED_TRANSFORMERS = wan.TRANSFORMERS


@dataclass(frozen=True)
class ClipParallelConfig:
    """Knobs of dual-scope attention; the defaults follow the reference code (see the doc's table).

    padding: latent frames of K/V taken from each neighbour, 0..shortest clip; also the half
        width of the local band.
    global_frames: global-scope frames, 0..latent frames (the reference's ``top_k``).
    phase_bias: logit bonus >= 0; at timesteps ``>= phase_boundary`` it goes to global keys, below
        it to local keys (reference: 10 and 850). 0 disables it.
    phase_boundary: timestep (scheduler units, 0..1000) where the bias switches scope.
    local_scope: ``"band"`` (reference: frames ``i - p .. i + p`` for query frame ``i``) or
        ``"window"`` (the whole clip plus both halos for every query).
    end_keys: ``"zeros"`` (reference: ``padding`` all-zero K/V frames at each video end) or
        ``"none"`` (no keys there).
    global_sampling: ``"clip_stride"`` (reference: a stride per clip, duplicates kept) or
        ``"uniform"`` (evenly over the video, deduplicated against the local keys).
    """

    padding: int = 1
    global_frames: int = 4
    phase_bias: float = 10.0
    phase_boundary: float = 850.0
    local_scope: str = "band"
    end_keys: str = "zeros"
    global_sampling: str = "clip_stride"

    def __post_init__(self) -> None:
        for name in ("padding", "global_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value}")
        for name, hi in (("phase_bias", float("inf")), ("phase_boundary", 1000.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not 0.0 <= value <= hi or value != value:
                raise ValueError(f"{name} must be in [0, {hi:g}], got {value}")
        for name, allowed in (
            ("local_scope", LOCAL_SCOPES),
            ("end_keys", END_KEYS),
            ("global_sampling", GLOBAL_SAMPLING),
        ):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be one of {allowed}, got {type(value).__name__}")
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def plan(self, num_latent_frames: int, world_size: int) -> ClipPlan:
        """The :class:`ClipPlan` of this config for a video of ``num_latent_frames`` on ``world_size`` ranks."""
        return ClipPlan.build(
            num_latent_frames, world_size, self.padding, self.global_frames,
            local_scope=self.local_scope, end_keys=self.end_keys, global_sampling=self.global_sampling,
        )  # fmt: skip


class ClipParallelStats(Stats):
    """Counters of one rank: self-attention calls, K/V bytes sent and received, time waiting for them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.comm_wait_s = 0.0
        self.key_frames = 0  # summed over calls: key frames per query frame, averaged in summary()

    def summary(self) -> dict[str, int | float | bool | None]:
        return {
            "calls": self.calls,
            "sent_bytes": self.sent_bytes,
            "recv_bytes": self.recv_bytes,
            "comm_wait_s": self.comm_wait_s,
            "key_frames_per_query": self.key_frames / self.calls if self.calls else None,
        }


@dataclass
class ClipParallelState:
    """What the processors of one run share: the plan, this rank, the timestep source, counters."""

    ctx: DistContext
    plan: ClipPlan
    config: ClipParallelConfig
    stats: ClipParallelStats = field(default_factory=ClipParallelStats)
    timestep: float | None = None
    timestep_callback: Callable[[], Any] | None = None
    to_global: bool = False  # the phase bias's scope at this step, set before the forward (phase_to_global)
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    @property
    def clip(self) -> tuple[int, int]:
        return self.plan.clips[self.ctx.rank]

    def current_timestep(self) -> float:
        """The scheduler's timestep: from the callback, else the transformer's ``timestep`` argument."""
        if self.timestep_callback is not None:
            return read_timestep(self.timestep_callback())
        if self.timestep is None:
            raise ValueError("phase_bias needs the timestep: call the patched transformer with `timestep=`")
        return self.timestep

    def phase_to_global(self) -> bool:
        """Whether the phase bias goes to the global keys at the current timestep; False when no
        bias applies (``phase_bias == 0`` or this rank has no global keys)."""
        cfg = self.config
        if cfg.phase_bias == 0 or not self.plan.global_keys(self.ctx.rank):
            return False
        return self.current_timestep() >= cfg.phase_boundary

    def layout(self) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
        """Key frames of this rank (virtual positions, in key order), whether each is local, and for
        each query frame of the clip the ``[lo, hi)`` slice of the local keys it sees."""
        rank = self.ctx.rank
        if "layout" not in self._cache:
            local = list(self.plan.local_keys(rank))
            glob = list(self.plan.global_keys(rank))
            mask = self.plan.local_mask(rank)
            slices = []
            for row in mask:
                seen = torch.nonzero(row).flatten().tolist()
                slices.append((seen[0], seen[-1] + 1) if seen else (0, 0))
            self._cache["layout"] = (local + glob, [True] * len(local) + [False] * len(glob), slices)
        return self._cache["layout"]

    def count_calls(self, calls: int) -> None:
        """Add ``calls`` self-attention calls to the stats (host-side, once per forward: counters
        mutated inside a compiled forward would be guarded on and recompile it every step)."""
        keys_at, is_local, slices = self.layout()
        start, end = self.clip
        per_call = sum(hi - lo for lo, hi in slices) / (end - start) + (len(keys_at) - sum(is_local))
        for _ in range(calls):
            self.stats.calls += 1
            self.stats.key_frames += per_call

    def key_bias(self, local_tokens: int, global_tokens: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """Additive key bias ``(1, 1, 1, keys)`` for the current timestep, or ``None`` (no bias)."""
        cfg = self.config
        if cfg.phase_bias == 0 or global_tokens == 0:
            return None
        to_global = self.to_global
        key = (local_tokens, global_tokens, device, dtype, to_global)
        if key not in self._cache:
            bias = torch.zeros(local_tokens + global_tokens, device=device, dtype=dtype)
            if to_global:
                bias[local_tokens:] = cfg.phase_bias
            else:
                bias[:local_tokens] = cfg.phase_bias
            self._cache[key] = bias.view(1, 1, 1, -1)
        return self._cache[key]


class ClipParallelHandle(PatchHandle):
    """The :class:`PatchHandle` of :func:`apply_clip_parallel`: ``state`` (plan) and ``stats``."""

    state: ClipParallelState
    stats: ClipParallelStats


def _all_gather_frames_async(state: ClipParallelState, frames: Tensor) -> CommHandle[list[Tensor]]:
    """Post an all-gather of every rank's global frames ``(g_r, ...)``, padded to the largest g_r.

    The per-rank counts are static (from the plan), so no shape handshake is needed.
    """
    ctx, plan, stats = state.ctx, state.plan, state.stats
    longest = max(len(plan.owned_globals(r)) for r in range(ctx.world_size))
    padded = frames.new_zeros((longest, *frames.shape[1:]))
    padded[: frames.shape[0]] = frames
    buffers = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    try:
        work = dist.all_gather(buffers, padded, group=ctx.group, async_op=True)
    except Exception as exc:
        raise CommError(f"rank {ctx.rank}: posting the global-scope all-gather failed: {exc}") from exc
    stats.sent_bytes += padded.numel() * padded.element_size()
    stats.recv_bytes += (ctx.world_size - 1) * padded.numel() * padded.element_size()
    return CommHandle(ctx, [work], "global-scope K/V all-gather", buffers)


class DualScopeAttnProcessor:
    """Self-attention of one clip over its local keys (band or window) and the global keys."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: ClipParallelState) -> None:
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("DualScopeAttnProcessor is for self-attention without a mask (blocks[i].attn1)")
        st, ctx, plan = self.state, self.state.ctx, self.state.plan
        start, end = st.clip
        frames = end - start
        batch, tokens, _ = hidden_states.shape
        if tokens % frames:
            raise ValueError(f"{tokens} tokens do not split into the clip's {frames} latent frames")
        per_frame = tokens // frames
        keys_at, is_local, slices = st.layout()
        num_local = sum(is_local)

        query, key, value = wan.project_qkv(attn, hidden_states, rotary=rotary_emb)
        # frames first: (frames, 2, batch, tokens per frame, heads, head dim)
        kv = torch.stack([key, value]).unflatten(2, (frames, per_frame)).movedim(2, 0)

        # post both exchanges, then wait while the queries are rearranged
        pad = plan.padding if ctx.world_size > 1 else 0
        halo = None
        if pad:
            halo = exchange_neighbours_async(ctx, kv[:pad], kv[frames - pad :], tag=1)
            frame_bytes = kv[0].numel() * kv.element_size()
            neighbours = (ctx.rank > 0) + (ctx.rank < ctx.world_size - 1)
            st.stats.sent_bytes += neighbours * pad * frame_bytes
            st.stats.recv_bytes += neighbours * pad * frame_bytes
        owned = plan.owned_globals(ctx.rank)
        gathered = None
        if plan.global_indices and ctx.world_size > 1:
            own = torch.tensor([i - start for i in owned], dtype=torch.long, device=kv.device)
            gathered = _all_gather_frames_async(st, kv.index_select(0, own))

        from_left = from_right = chunks = None
        if halo is not None or gathered is not None:  # world size 1: nothing to wait for, no clock read
            waited = time.perf_counter()
            if halo is not None:
                from_left, from_right = halo.wait()
            chunks = gathered.wait() if gathered is not None else None
            st.stats.comm_wait_s += time.perf_counter() - waited

        # local keys in the plan's order: left halo (or zeros), the clip, right halo (or zeros)
        local_at = keys_at[:num_local]
        left_n = sum(1 for f in local_at if f < start)
        right_n = sum(1 for f in local_at if f >= end)
        zeros = kv.new_zeros((plan.padding, *kv.shape[1:])) if plan.end_keys == "zeros" else None
        parts = []
        if left_n:
            parts.append(from_left if from_left is not None else zeros[:left_n])
        parts.append(kv)
        if right_n:
            parts.append(from_right if from_right is not None else zeros[:right_n])
        glob = [self._global_frame(frame, kv, chunks) for frame in keys_at[num_local:]]
        local_kv = torch.cat(parts) if len(parts) > 1 else kv
        global_kv = torch.stack(glob) if glob else None

        if plan.local_scope == "window":
            out = self._attend(attn, query, local_kv, global_kv, num_local, per_frame)
        else:  # one attention call per query frame over its band and the global frames
            q_frames = query.unflatten(1, (frames, per_frame))
            outs = [
                self._attend(attn, q_frames[:, i], local_kv[lo:hi], global_kv, hi - lo, per_frame)
                for i, (lo, hi) in enumerate(slices)
            ]
            out = torch.stack(outs, dim=1).flatten(1, 2)
        return wan.project_out(attn, out, query)

    def _global_frame(self, frame: int, kv: Tensor, chunks: list[Tensor] | None) -> Tensor:
        plan, start = self.state.plan, self.state.clip[0]
        owner = plan.owner(frame)
        if chunks is None or owner == self.state.ctx.rank:
            return kv[frame - start]
        return chunks[owner][plan.owned_globals(owner).index(frame)]

    def _attend(
        self, attn: Any, query: Tensor, local_kv: Tensor, global_kv: Tensor | None, n_local: int, per_frame: int
    ) -> Tensor:
        keys = local_kv if global_kv is None else torch.cat([local_kv, global_kv])
        keys = keys.movedim(0, 2).flatten(2, 3)  # (2, batch, key tokens, heads, head dim)
        n_global = 0 if global_kv is None else global_kv.shape[0]
        bias = self.state.key_bias(n_local * per_frame, n_global * per_frame, query.device, query.dtype)
        return wan.attention(attn, query, keys[0], keys[1], mask=bias)


def offset_rope(rope: torch.nn.Module, latent_shape: torch.Size, offset: int) -> tuple[Tensor, Tensor]:
    """``WanRotaryPosEmbed`` output for latents ``(B, C, F, H, W)`` whose first frame is video frame ``offset``."""
    _, _, frames, height, width = latent_shape
    p_t, p_h, p_w = rope.patch_size
    ppf, pph, ppw = frames // p_t, height // p_h, width // p_w
    if offset < 0 or offset + ppf > rope.max_seq_len:
        raise ValueError(
            f"latent frames [{offset}, {offset + ppf}) are outside the transformer's rope_max_seq_len="
            f"{rope.max_seq_len}"
        )
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t, h, w = table.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
        grid = (ppf, pph, ppw, -1)
        parts = [
            t[offset : offset + ppf].view(ppf, 1, 1, -1).expand(grid),
            h[:pph].view(1, pph, 1, -1).expand(grid),
            w[:ppw].view(1, 1, ppw, -1).expand(grid),
        ]
        out.append(torch.cat(parts, dim=-1).reshape(1, ppf * pph * ppw, 1, -1))
    return out[0], out[1]


def check_transformer(transformer: torch.nn.Module, technique: str) -> None:
    """``TypeError`` / ``ValueError`` unless ``transformer`` is a Wan model this package can split."""
    name = type(transformer).__name__
    if name not in wan.TRANSFORMERS:
        raise TypeError(f"{technique} supports {wan.TRANSFORMERS}, got {name}")
    if transformer.config.patch_size[0] != 1:
        raise ValueError(f"{technique} needs a temporal patch size of 1, got {transformer.config.patch_size}")
    try:
        wan.check_self_attention(transformer, technique)
    except NotImplementedError as exc:
        raise ValueError(str(exc)) from None


def apply_clip_parallel(
    transformer: torch.nn.Module,
    config: ClipParallelConfig | None = None,
    *,
    ctx: DistContext,
    num_latent_frames: int,
    current_timestep_callback: Callable[[], Any] | None = None,
) -> ClipParallelHandle:
    """Make ``transformer`` compute this rank's clip of a ``num_latent_frames``-frame video.

    ``config=None`` means ``ClipParallelConfig()``. Installs a :class:`DualScopeAttnProcessor` on
    every ``blocks[i].attn1``, a hook on ``rope`` that shifts frame positions to the clip's place
    in the video, and a pre-forward hook that checks the input is this rank's clip and records the
    timestep (for the phase bias; ``current_timestep_callback``, e.g. ``lambda:
    pipe.current_timestep``, takes precedence). Call the transformer on the clip's latents
    ``(B, C, end - start, H, W)`` on every rank in lockstep.
    """
    from mmaccel.runtime.pipelines import apply_to_pipeline, is_pipeline, timestep_callback

    if is_pipeline(transformer):  # every transformer of the pipeline (Wan 2.2: both experts), one handle
        return apply_to_pipeline(transformer, apply_clip_parallel, ClipParallelHandle, "clip_parallel", config,
                                 ctx=ctx, num_latent_frames=num_latent_frames,
                                 current_timestep_callback=timestep_callback(transformer, current_timestep_callback))
    config = resolve_config(config, ClipParallelConfig)
    if not isinstance(ctx, DistContext):
        raise TypeError(f"ctx must be a DistContext, got {type(ctx).__name__}")
    if isinstance(num_latent_frames, bool) or not isinstance(num_latent_frames, int) or num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be an int >= 1, got {num_latent_frames!r}")
    check_timestep_callback(current_timestep_callback)
    check_transformer(transformer, "clip parallelism")
    plan = config.plan(num_latent_frames, ctx.world_size)
    state = ClipParallelState(ctx=ctx, plan=plan, config=config, timestep_callback=current_timestep_callback)
    handle = ClipParallelHandle(transformer, "clip_parallel")
    handle.state = state
    handle.stats = state.stats
    start, end = state.clip
    state.layout()  # computed (host-side) once here, so the processors only read it

    @torch.compiler.disable  # host-side checks and timestep, before the forward's first tensor op
    def pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and hidden.shape[2] != end - start:
            raise ValueError(
                f"rank {ctx.rank} owns latent frames [{start}, {end}) but the transformer got {hidden.shape[2]} frames"
            )
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        state.timestep = None if timestep is None else read_timestep(timestep, source="the transformer's timestep")
        state.to_global = state.phase_to_global()
        state.count_calls(len(module.blocks))

    def rope_hook(module: torch.nn.Module, args: tuple, output: Any) -> tuple[Tensor, Tensor]:
        return offset_rope(module, args[0].shape, start)

    handle.add_torch_hook(transformer.register_forward_pre_hook(pre_forward, with_kwargs=True))
    handle.add_torch_hook(transformer.rope.register_forward_hook(rope_hook))
    processor = DualScopeAttnProcessor(state)
    for block in transformer.blocks:
        handle.set_processor(block.attn1, processor)
    return handle
