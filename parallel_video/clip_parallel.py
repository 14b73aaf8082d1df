"""Clip parallelism with dual-scope attention (Video-Infinity, Tan et al. 2024, arXiv:2406.16260).

Each rank runs the whole ``WanTransformer3DModel`` on its own contiguous clip of latent frames.
Tokens only meet in self-attention, where :class:`DualScopeAttnProcessor` lets every query of a
clip attend, in one attention call, to

* **local scope**: the clip's own frames plus ``padding`` boundary frames of K/V from each
  neighbouring rank (point-to-point ``batch_isend_irecv``); a missing neighbour at either end of
  the video contributes no keys at all (nothing to mask, no zero padding taking softmax weight);
* **global scope**: the K/V of ``global_frames`` frames sampled uniformly over the whole video
  (all-gather), minus those already in the local window, so every frame is a key at most once.

Both exchanges are posted as soon as K and V exist; the query projection runs while they are in
flight. The optional phase bias (the paper's +10 logit toward local keys at late, low-noise steps
and toward global keys at early ones) is an additive key mask built once per run. Frame positions
(RoPE) are the global frame indices, so with one rank the processor computes exactly the dense
model, and with N ranks exactly the dense model under the dual-scope mask
(see ``tests/test_parallel_video.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmaccel.parallel_video.plan import ClipPlan
from mmaccel.runtime.adapters import wan
from mmaccel.runtime.distributed import CommError, CommHandle, DistContext, exchange_neighbours_async
from mmaccel.runtime.patching import PatchHandle

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "ClipParallelConfig",
    "ClipParallelHandle",
    "ClipParallelState",
    "DualScopeAttnProcessor",
    "apply_clip_parallel",
    "offset_rope",
]

SUPPORTED_TRANSFORMERS = ("WanTransformer3DModel",)


@dataclass(frozen=True)
class ClipParallelConfig:
    """Knobs of dual-scope attention.

    padding: latent frames of K/V taken from each neighbour (local scope), 0..clip length.
    global_frames: latent frames sampled uniformly over the video for global scope (0 = none).
    phase_bias: logit bonus, >= 0; at timesteps ``>= phase_boundary`` it goes to global keys,
        below it to local keys (paper: 10 and 800). 0 disables the bias.
    phase_boundary: timestep (scheduler units, 0..1000) where the bias switches scope.
    """

    padding: int = 1
    global_frames: int = 4
    phase_bias: float = 0.0
    phase_boundary: float = 800.0

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


@dataclass
class ClipParallelState:
    """What the processors of one run share: the plan, this rank, the current timestep, counters.

    ``sent_bytes`` / ``recv_bytes`` count the K/V bytes this rank sent and received in
    self-attention; ``comm_wait_s`` the time spent waiting for them after the overlapped work.
    """

    ctx: DistContext
    plan: ClipPlan
    config: ClipParallelConfig
    timestep: float | None = None
    calls: int = 0
    sent_bytes: int = 0
    recv_bytes: int = 0
    comm_wait_s: float = 0.0
    _bias_cache: dict[tuple, tuple[Tensor, Tensor] | None] = field(default_factory=dict, repr=False)

    @property
    def clip(self) -> tuple[int, int]:
        return self.plan.clips[self.ctx.rank]

    def key_frames(self) -> tuple[list[int], list[bool]]:
        """Video frame index of each key frame, in key order, and whether it is local scope."""
        lo, hi = self.plan.window(self.ctx.rank)
        extra = list(self.plan.extra_globals(self.ctx.rank))
        return list(range(lo, hi)) + extra, [True] * (hi - lo) + [False] * len(extra)

    def key_bias(self, tokens_per_frame: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """Additive key mask ``(1, 1, 1, keys)`` for the current timestep, or ``None`` (no bias).

        Built once per (tokens per frame, device, dtype) and reused by every layer and step.
        """
        cfg = self.config
        _, is_local = self.key_frames()
        if cfg.phase_bias == 0 or all(is_local):
            return None
        if self.timestep is None:
            raise RuntimeError("phase_bias needs the timestep: call the patched transformer with `timestep=`")
        key = (tokens_per_frame, device, dtype)
        if key not in self._bias_cache:
            local = torch.tensor(is_local, device=device).repeat_interleave(tokens_per_frame)
            bonus = torch.tensor(cfg.phase_bias, device=device, dtype=dtype)
            zero = torch.zeros((), device=device, dtype=dtype)
            to_local = torch.where(local, bonus, zero).view(1, 1, 1, -1)
            to_global = torch.where(local, zero, bonus).view(1, 1, 1, -1)
            self._bias_cache[key] = (to_local, to_global)
        to_local, to_global = self._bias_cache[key]
        return to_global if self.timestep >= cfg.phase_boundary else to_local


class ClipParallelHandle(PatchHandle):
    """The :class:`PatchHandle` of :func:`apply_clip_parallel`; ``state`` holds plan and counters."""

    state: ClipParallelState


def _all_gather_frames_async(state: ClipParallelState, frames: Tensor) -> CommHandle[list[Tensor]]:
    """Post an all-gather of every rank's global frames ``(g_r, ...)``, padded to the largest g_r.

    The per-rank counts are static (from the plan), so unlike ``all_gather_varlen`` no shape
    handshake is needed and the call returns at once.
    """
    ctx, plan = state.ctx, state.plan
    longest = max(len(plan.owned_globals(r)) for r in range(ctx.world_size))
    padded = frames.new_zeros((longest, *frames.shape[1:]))
    padded[: frames.shape[0]] = frames
    if ctx.group is None:
        return CommHandle(ctx, [], "", [padded])
    buffers = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    try:
        work = dist.all_gather(buffers, padded, group=ctx.group, async_op=True)
    except Exception as exc:
        raise CommError(f"rank {ctx.rank}: posting the global-scope all-gather failed: {exc}") from exc
    state.sent_bytes += padded.numel() * padded.element_size()
    state.recv_bytes += (ctx.world_size - 1) * padded.numel() * padded.element_size()
    return CommHandle(ctx, [work], "global-scope K/V all-gather", buffers)


class DualScopeAttnProcessor:
    """Self-attention of one clip over local (own + neighbour halos) and global keys."""

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
        st.calls += 1

        query, key, value = wan.project_qkv(attn, hidden_states, rotary=rotary_emb)
        # frames first: (frames, 2, batch, tokens per frame, heads, head dim)
        kv = torch.stack([key, value]).unflatten(2, (frames, per_frame)).movedim(2, 0)

        # post both exchanges, then project the queries while they are in flight
        pad = plan.padding if ctx.world_size > 1 else 0
        halo = None
        if pad:
            halo = exchange_neighbours_async(ctx, kv[:pad], kv[frames - pad :], tag=1)
            frame_bytes = kv[0].numel() * kv.element_size()
            neighbours = (ctx.rank > 0) + (ctx.rank < ctx.world_size - 1)
            st.sent_bytes += neighbours * pad * frame_bytes
            st.recv_bytes += neighbours * pad * frame_bytes
        gathered = None
        if plan.global_indices and ctx.world_size > 1:
            own = torch.tensor(
                [i - start for i in plan.owned_globals(ctx.rank)], dtype=torch.long, device=kv.device
            )
            gathered = _all_gather_frames_async(st, kv.index_select(0, own))

        waited = time.perf_counter()
        parts = [kv]
        if halo is not None:
            from_left, from_right = halo.wait()
            parts = [p for p in (from_left, kv, from_right) if p is not None]
        if gathered is not None:
            chunks = gathered.wait()
            extra = [chunks[owner][pos] for owner, pos in _extra_sources(plan, ctx.rank)]
            if extra:
                parts.append(torch.stack(extra))
        st.comm_wait_s += time.perf_counter() - waited

        keys = torch.cat(parts) if len(parts) > 1 else kv
        keys = keys.movedim(0, 2).flatten(2, 3)  # (2, batch, key tokens, heads, head dim)
        bias = st.key_bias(per_frame, query.device, query.dtype)
        out = wan.attention(attn, query, keys[0], keys[1], mask=bias)
        return wan.project_out(attn, out, query)


def _extra_sources(plan: ClipPlan, rank: int) -> list[tuple[int, int]]:
    """For each extra global frame of ``rank``: (owning rank, position in its gathered chunk)."""
    sources = []
    for frame in plan.extra_globals(rank):
        owner = next(r for r, (s, e) in enumerate(plan.clips) if s <= frame < e)
        sources.append((owner, plan.owned_globals(owner).index(frame)))
    return sources


def offset_rope(rope: torch.nn.Module, latent_shape: torch.Size, offset: int) -> tuple[Tensor, Tensor]:
    """``WanRotaryPosEmbed`` output for latents ``(B, C, F, H, W)`` whose first frame is video frame ``offset``."""
    _, _, frames, height, width = latent_shape
    p_t, p_h, p_w = rope.patch_size
    ppf, pph, ppw = frames // p_t, height // p_h, width // p_w
    if offset + ppf > rope.max_seq_len:
        raise ValueError(
            f"latent frames up to {offset + ppf} exceed the transformer's rope_max_seq_len={rope.max_seq_len}"
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


def apply_clip_parallel(
    transformer: torch.nn.Module, config: ClipParallelConfig, ctx: DistContext, num_latent_frames: int
) -> ClipParallelHandle:
    """Make ``transformer`` compute this rank's clip of a ``num_latent_frames``-frame video.

    Installs a :class:`DualScopeAttnProcessor` on every ``blocks[i].attn1``, a hook on ``rope``
    that shifts frame positions to the clip's place in the video, and a pre-forward hook that
    checks the input is this rank's clip and records the timestep (for the phase bias). Call the
    transformer on the clip's latents ``(B, C, end - start, H, W)`` on every rank in lockstep.
    """
    name = type(transformer).__name__
    if name not in SUPPORTED_TRANSFORMERS:
        raise TypeError(f"clip parallelism supports {SUPPORTED_TRANSFORMERS}, got {name}")
    if transformer.config.patch_size[0] != 1:
        raise ValueError(
            f"clip parallelism needs a temporal patch size of 1, got {transformer.config.patch_size}"
        )
    for i, block in enumerate(transformer.blocks):
        if block.attn1.add_k_proj is not None or getattr(block.attn1, "fused_projections", False):
            raise ValueError(
                f"blocks[{i}].attn1 has fused or image projections, which clip parallelism does not support"
            )
    plan = ClipPlan.build(num_latent_frames, ctx.world_size, config.padding, config.global_frames)
    state = ClipParallelState(ctx=ctx, plan=plan, config=config)
    handle = ClipParallelHandle(transformer, "clip_parallel")
    handle.state = state
    start, end = state.clip

    def pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and hidden.shape[2] != end - start:
            raise ValueError(
                f"rank {ctx.rank} owns latent frames [{start}, {end}) but the transformer got {hidden.shape[2]} frames"
            )
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        state.timestep = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])

    def rope_hook(module: torch.nn.Module, args: tuple, output: Any) -> tuple[Tensor, Tensor]:
        return offset_rope(module, args[0].shape, start)

    handle.add_torch_hook(transformer.register_forward_pre_hook(pre_forward, with_kwargs=True))
    handle.add_torch_hook(transformer.rope.register_forward_hook(rope_hook))
    processor = DualScopeAttnProcessor(state)
    for block in transformer.blocks:
        handle.set_processor(block.attn1, processor)
    return handle
