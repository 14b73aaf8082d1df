"""Block-wise layer pipeline (DualParal, Wang et al. 2025, arXiv:2505.21070) for Wan.

Two parts:

* :class:`LayerStage` — the per-rank computation: a contiguous range of the transformer's blocks
  run for one frame block at one denoising step (the first stage also embeds the latents, the
  last one runs the output head). Attention goes through :mod:`mmaccel.runtime.adapters.wan`; the
  cross-block context is a small attention processor fed by :class:`BlockContext`. A chain of
  stages over all blocks equals the transformer's forward on the same input (tested).
* :func:`run_layer_pipeline` — the driver: it walks the :class:`~.schedule.BlockSchedule`, feeds
  each stage its inputs, moves hidden states rank to rank and latents from the last rank back to
  rank 0 through preallocated :class:`~mmaccel.runtime.distributed.PipeChannel` buffers, steps
  each block's own copy of the scheduler and keeps the context cache. Every ``checkpoint_every``
  iterations it hands each rank's state to ``on_checkpoint``; given such a state (``resume=``)
  it continues to the same result bit for bit.

Context between blocks (``LayerPipelineConfig.context``):

* ``"reference"`` (default, as DualParal's code): block ``b``'s input is the previous block's last
  ``num_cat`` latent frames (recomputed as extra input tokens, their outputs dropped) followed by
  its own frames, and in every layer its queries also see the cached K/V of the next block's
  first ``num_cat`` frames, computed just before in the same iteration (so ``Num_C = 2 num_cat``).
  Within an iteration the newest block runs first (``order="newest_first"``).
* ``"prev_kv"`` (option): in every layer a block's queries also see the cached K/V of the previous
  block's last ``num_cat`` frames; no extra input tokens; best with ``order="oldest_first"``.

Coordinated noise: one noise template, reused as a frame-shuffled copy per block.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmaccel.parallel_video.checkpoint import restore_scheduler, scheduler_state
from mmaccel.parallel_video.clip_parallel import offset_rope
from mmaccel.parallel_video.noise import frame_noise, frame_seed
from mmaccel.parallel_video.schedule import ORDERS, BlockSchedule, split_stages
from mmaccel.runtime.adapters import wan
from mmaccel.runtime.budget import allocate
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.distributed import CommHandle, DistContext, PipeChannel
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.pipelines import expert_for, pipeline_transformers

__all__ = [
    "CONTEXTS",
    "BlockContext",
    "CachedContextAttnProcessor",
    "LayerPipelineConfig",
    "LayerStage",
    "StageConditions",
    "block_noise",
    "block_sizes",
    "context_frames",
    "run_layer_pipeline",
]

CONTEXTS = ("reference", "prev_kv")
_MAX_PENDING_SENDS = 4


@dataclass(frozen=True)
class LayerPipelineConfig:
    """DualParal's knobs; the defaults follow its reference code.

    frames_per_block: the largest block, in latent frames (>= 1; reference ``num_per_block`` 10).
        The video is split into ``ceil(frames / frames_per_block)`` balanced blocks, so every
        frame count works (blocks differ by at most one frame).
    num_cat: context frames, 0..frames_per_block (reference 5): see ``context``.
    context: ``"reference"`` (previous block's last ``num_cat`` latents as recomputed input and the
        next block's first ``num_cat`` frames as cached K/V) or ``"prev_kv"`` (the previous
        block's last ``num_cat`` frames as cached K/V only).
    order: ``"newest_first"`` (reference) or ``"oldest_first"``: which block of an iteration runs first.
    tail_lag: 0 or 1, ``"reference"`` context only: the previous block's latents fed as input are
        the ones a single process has at that moment (0, the reference on one GPU), or one update
        older (1), which rank 0 already holds, so it never waits for the last rank (the reference
        on several GPUs uses whichever copy has arrived).
    """

    frames_per_block: int = 10
    num_cat: int = 5
    context: str = "reference"
    order: str = "newest_first"
    tail_lag: int = 0

    def __post_init__(self) -> None:
        for name, low in (("frames_per_block", 1), ("num_cat", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value}")
        if self.num_cat > self.frames_per_block:
            raise ValueError(
                f"num_cat must be in [0, frames_per_block={self.frames_per_block}], got {self.num_cat}"
            )
        if isinstance(self.tail_lag, bool) or not isinstance(self.tail_lag, int) or self.tail_lag not in (0, 1):
            raise ValueError(f"tail_lag must be 0 or 1, got {self.tail_lag!r}")
        for name, allowed in (("context", CONTEXTS), ("order", ORDERS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def block_sizes(num_latent_frames: int, frames_per_block: int) -> tuple[int, ...]:
    """``ceil(n / frames_per_block)`` balanced block lengths (earlier blocks get the extra frame)."""
    if isinstance(num_latent_frames, bool) or not isinstance(num_latent_frames, int) or num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be an int >= 1, got {num_latent_frames!r}")
    count = math.ceil(num_latent_frames / frames_per_block)
    sizes = allocate(num_latent_frames, torch.ones(count), torch.full((count,), frames_per_block))
    return tuple(int(s) for s in sizes.tolist())


def context_frames(sizes: tuple[int, ...], config: LayerPipelineConfig, block: int) -> dict[str, tuple[int, ...]]:
    """The context of ``block`` as video frame indices, by the rules of ``config.context``.

    ``"input"``: latent frames prepended to the block's own as recomputed input tokens;
    ``"cached_kv"``: frames whose cached K/V the block's queries also attend to (when the block
    that owns them has run before it in the same iteration, ``"reference"``; or at all, ``"prev_kv"``).
    """
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    nc = config.num_cat
    prev_tail: tuple[int, ...] = ()
    next_head: tuple[int, ...] = ()
    if block > 0:
        end = starts[block]
        prev_tail = tuple(range(end - min(nc, sizes[block - 1]), end))
    if block + 1 < len(sizes):
        first = starts[block + 1]
        next_head = tuple(range(first, first + min(nc, sizes[block + 1])))
    if config.context == "reference":
        return {"input": prev_tail, "cached_kv": next_head}
    return {"input": (), "cached_kv": prev_tail}


def block_noise(seed: int, block: int, frames_per_block: int, frame_shape: tuple[int, int, int]) -> Tensor:
    """Coordinated noise: the block template ``frame_noise(seed, 0..fpb)`` with its frames shuffled
    by a permutation drawn from ``(seed, block)`` (block 0 keeps the template's order)."""
    template = frame_noise(seed, range(frames_per_block), frame_shape)
    if block == 0:
        return template
    generator = torch.Generator("cpu").manual_seed(frame_seed(seed, -1 - block))
    return template[:, :, torch.randperm(frames_per_block, generator=generator)]


# ----------------------------------------------------------------------------------- the stage


@dataclass
class StageConditions:
    """Per-step inputs every block of a stage shares: ``temb``, block modulation, projected text."""

    temb: Tensor
    proj: Tensor
    text: Tensor


@dataclass
class BlockContext:
    """The cross-block K/V context of the layers of one stage (rank-local; never communicated).

    Before each item the driver sets ``store`` (token range of this block's K/V to cache, or
    None) and ``use`` (the cache key to attend to, or None); processors read and write ``kv``.
    """

    store: tuple[int, int] | None = None
    store_as: Any = None
    use: Any = None
    kv: dict[tuple[int, Any], tuple[Tensor, Tensor]] = field(default_factory=dict)
    extra_key_tokens: int = 0

    def evict(self) -> None:
        """Forget every cached K/V."""
        self.kv.clear()

    def drop(self, name: Any) -> None:
        """Forget the K/V stored under ``name`` (every layer)."""
        for key in [k for k in self.kv if k[1] == name]:
            del self.kv[key]


class CachedContextAttnProcessor:
    """Self-attention of one frame block's tokens plus cached K/V of another block (``BlockContext``).

    :class:`LayerStage` moves the K/V between the context and the processor, host-side before and
    after its blocks: ``cached`` (the K/V to attend to, or None) in, ``stored`` (this call's K/V
    slice ``context.store``) out. The processor itself never reads or writes ``context.kv``, so a
    compiled stage does not guard on the cache's contents (no recompile per frame block).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, context: BlockContext, layer: int) -> None:
        self.context = context
        self.layer = layer
        self.cached: tuple[Tensor, Tensor] | None = None
        self.stored: tuple[Tensor, Tensor] | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "CachedContextAttnProcessor is for self-attention without a mask (blocks[i].attn1)"
            )
        query, key, value = wan.project_qkv(attn, hidden_states, rotary=rotary_emb)
        if self.context.store is not None:
            lo, hi = self.context.store
            self.stored = (key[:, lo:hi], value[:, lo:hi])
        cached = self.cached
        if cached is not None:
            key, value = torch.cat([key, cached[0]], dim=1), torch.cat([value, cached[1]], dim=1)
        return wan.project_out(attn, wan.attention(attn, query, key, value), query)


class LayerStage:
    """Blocks ``[lo, hi)`` of a ``WanTransformer3DModel``, run for one frame block at one step.

    ``embed`` (first stage), ``__call__`` (the blocks) and ``head`` (last stage) are the pieces of
    the transformer's ``forward``; ``patch(context)`` installs :class:`CachedContextAttnProcessor`
    on this stage's self-attentions so that :class:`BlockContext` adds cross-block K/V.
    """

    def __init__(self, transformer: torch.nn.Module, lo: int, hi: int) -> None:
        name = type(transformer).__name__
        if name not in wan.TRANSFORMERS:
            raise TypeError(f"the layer pipeline supports {wan.TRANSFORMERS}, got {name}")
        if not 0 <= lo < hi <= len(transformer.blocks):
            raise ValueError(
                f"stage blocks [lo, hi) must satisfy 0 <= lo < hi <= {len(transformer.blocks)}, got [{lo}, {hi})"
            )
        if transformer.config.patch_size[0] != 1:
            raise ValueError(f"the layer pipeline needs a temporal patch size of 1, got {transformer.config.patch_size}")
        for i in range(lo, hi):  # only this stage's blocks: a rank may hold no others
            attn = transformer.blocks[i].attn1
            if getattr(attn, "add_k_proj", None) is not None:  # fused q/k/v is fine: wan.project_qkv uses it
                raise ValueError(
                    f"the layer pipeline: blocks[{i}].attn1 has image-conditioning projections "
                    "(image-to-video Wan is not supported)"
                )
        self.transformer, self.lo, self.hi = transformer, lo, hi
        self.processors: list[CachedContextAttnProcessor] = []

    def patch(self, context: BlockContext) -> PatchHandle:
        handle = PatchHandle(self.transformer, "layer_pipeline")
        self.processors = [CachedContextAttnProcessor(context, i) for i in range(self.lo, self.hi)]
        for processor in self.processors:
            handle.set_processor(self.transformer.blocks[processor.layer].attn1, processor)
        return handle

    def conditions(self, timestep: Tensor, text: Tensor) -> StageConditions:
        """``temb``, per-block modulation and projected text for ``timestep`` (as ``forward`` does)."""
        t = timestep.reshape(-1).expand(text.shape[0]) if timestep.numel() == 1 else timestep
        temb, proj, text, _ = self.transformer.condition_embedder(t, text, None)
        return StageConditions(temb, proj.unflatten(1, (6, -1)), text)

    def rotary(self, latent_shape: torch.Size, first_frame: int) -> tuple[Tensor, Tensor]:
        """RoPE of latents ``(B, C, F, H, W)`` whose first frame is video frame ``first_frame``."""
        return offset_rope(self.transformer.rope, latent_shape, first_frame)

    def embed(self, latents: Tensor) -> Tensor:
        """Patch embedding of latents ``(B, C, F, H, W)`` -> tokens ``(B, F h w, dim)``."""
        hidden = self.transformer.patch_embedding(latents.to(self.transformer.dtype))
        return hidden.flatten(2).transpose(1, 2).contiguous()

    def __call__(self, hidden: Tensor, cond: StageConditions, rotary: tuple[Tensor, Tensor]) -> Tensor:
        self._load_context()
        for i in range(self.lo, self.hi):
            hidden = self.transformer.blocks[i](hidden, cond.text, cond.proj, rotary)
        self._store_context()
        return hidden

    @torch.compiler.disable  # host-side, before the blocks' first tensor op
    def _load_context(self) -> None:
        """Hand each processor the cached K/V it attends to (``context.use``) and count its tokens."""
        for p in self.processors:
            ctx = p.context
            p.stored = None
            p.cached = ctx.kv.get((p.layer, ctx.use)) if ctx.use is not None else None
            if p.cached is not None:
                ctx.extra_key_tokens += p.cached[0].shape[1]

    @torch.compiler.disable  # host-side, after the blocks' last tensor op
    def _store_context(self) -> None:
        """Move each processor's K/V slice into the context under ``context.store_as``."""
        for p in self.processors:
            if p.stored is not None:
                p.context.kv[(p.layer, p.context.store_as)] = p.stored
            p.cached = p.stored = None

    def head(self, hidden: Tensor, cond: StageConditions, latent_shape: torch.Size) -> Tensor:
        """Output norm, projection and unpatchify, as the end of ``WanTransformer3DModel.forward``."""
        tr = self.transformer
        _, _, frames, height, width = latent_shape
        p_t, p_h, p_w = tr.config.patch_size
        shift, scale = (tr.scale_shift_table + cond.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = tr.proj_out(hidden)
        hidden = hidden.reshape(hidden.shape[0], frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ----------------------------------------------------------------------------------- the driver


def _bounded(pending: deque[CommHandle[Any]], handle: CommHandle[Any]) -> None:
    """Keep at most a few sends in flight (their tensors stay alive until completed)."""
    pending.append(handle)
    while len(pending) > _MAX_PENDING_SENDS:
        pending.popleft().wait()


def _padded_to(tensor: Tensor, dim: int, length: int) -> Tensor:
    if tensor.shape[dim] == length:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = length
    out = tensor.new_zeros(shape)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


@torch.no_grad()
def run_layer_pipeline(
    pipe: Any,
    ctx: DistContext,
    config: LayerPipelineConfig | None = None,
    *,
    text: Tensor,
    guidance_scale: float,
    num_latent_frames: int,
    latent_hw: tuple[int, int],
    steps: int,
    seed: int,
    progress: bool = True,
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1,
    resume: dict[str, Any] | None = None,
) -> tuple[Tensor | None, dict[str, Any]]:
    """Denoise a ``num_latent_frames``-frame video block-wise over the ranks' layer stages.

    ``text`` is ``[cond]`` or ``[cond, uncond]`` prompt embeddings (CFG batch); returns the
    latents ``(1, C, F, h, w)`` on rank 0 (``None`` elsewhere) and per-rank stats. Every rank must
    call it with the same arguments.

    Checkpoints: after every ``checkpoint_every`` iterations of the schedule (and after the last)
    each rank calls ``on_checkpoint(n, state)``, ``n`` the iterations done and ``state`` its part
    of the run (tensors on the CPU and plain values only): ``latents`` (rank 0: every block
    started so far, finished ones included; the last rank: the blocks in flight), ``done``
    (updates applied per block), ``versions`` (rank 0: the last three versions of each block, for
    the next block's input prefix), ``schedulers`` (the last rank: the state of each in-flight
    block's scheduler copy) and ``kv`` (the cached context K/V of this rank's layers that later
    items read; ``"prev_kv"`` only: the ``"reference"`` cache lives within one iteration). At an
    iteration boundary no hidden state is in flight between stages; rank 0 first takes the last
    rank's latent updates of the iteration, so a checkpoint briefly drains the pipeline.
    ``resume``: such a ``state`` of this rank, saved after the same ``n`` on every rank; the run
    continues with iteration ``n`` and returns what the uninterrupted run returns, bit for bit.
    """
    config = resolve_config(config, LayerPipelineConfig)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    transformers = pipeline_transformers(pipe)  # Wan 2.2 A14B: two experts, switched at boundary_ratio
    transformer = transformers["transformer"] if "transformer" in transformers else next(iter(transformers.values()))
    if len({len(t.blocks) for t in transformers.values()}) != 1:
        raise ValueError(f"the layer pipeline needs experts of one depth, got {[len(t.blocks) for t in transformers.values()]}")
    sizes = block_sizes(num_latent_frames, config.frames_per_block)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    schedule = BlockSchedule(len(sizes), steps, iteration_order=config.order)
    start_iteration = 0 if resume is None else int(resume["iterations"])
    if not 0 <= start_iteration <= schedule.num_iterations:
        raise ValueError(
            f"resume: the state is after {start_iteration} iterations, the schedule has {schedule.num_iterations}"
        )
    lo, hi = split_stages(len(transformer.blocks), ctx.world_size)[ctx.rank]
    stages = {attr: LayerStage(t, lo, hi) for attr, t in transformers.items()}  # this rank's blocks of each expert
    first, last = ctx.rank == 0, ctx.rank == ctx.world_size - 1
    multi = ctx.world_size > 1
    device, dtype = ctx.device, transformer.dtype
    channels = transformer.config.in_channels
    _, p_h, p_w = transformer.config.patch_size
    tokens_per_frame = (latent_hw[0] // p_h) * (latent_hw[1] // p_w)
    batch = text.shape[0]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps
    step_expert = [expert_for(pipe, t) for t in timesteps.tolist()]  # decided on the host, once
    contexts = [context_frames(sizes, config, b) for b in range(len(sizes))]
    longest = max(sizes)
    max_input = longest + (config.num_cat if config.context == "reference" else 0)

    cache = BlockContext()  # shared by the experts: a block's context K/V may come from the other expert
    handles = [stage.patch(cache) for stage in stages.values()]
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    hidden_ch = PipeChannel(ctx, (batch, max_input * tokens_per_frame, dim), dtype, tag=11) if multi else None
    # rank 0 keeps receives for the last rank's latent updates posted ahead, so those sends always
    # complete: at most ~2 iterations of updates are produced but not yet consumed
    in_flight = max(schedule.in_flight(k) for k in range(schedule.num_iterations))
    back_buffers = 2 * in_flight + _MAX_PENDING_SENDS + 2
    back_shape = (1, channels, longest, *latent_hw)
    back_ch = (
        PipeChannel(ctx, back_shape, torch.float32, ring=True, num_buffers=back_buffers, tag=12) if multi else None
    )
    order = schedule.order()
    items_before = sum(schedule.in_flight(k) for k in range(start_iteration))
    expected = deque(order[items_before:])  # every update goes back to rank 0, the last one included
    posted: deque[tuple[tuple[int, int], CommHandle[Tensor]]] = deque()

    def post_receives() -> None:
        while first and multi and expected and len(posted) < back_buffers - 1:
            posted.append((expected.popleft(), back_ch.recv_prev_async()))

    latents: dict[int, Tensor] = {}
    done: dict[int, int] = {}  # rank 0: updates applied to its copy of each block's latents
    versions: dict[int, dict[int, Tensor]] = {}  # rank 0: the last three versions of each block

    def keep_version(block: int) -> None:
        kept = versions.setdefault(block, {})
        kept[done[block]] = latents[block]
        for old in [c for c in kept if c < done[block] - 2]:
            del kept[old]

    schedulers: dict[int, Any] = {}
    sends: deque[CommHandle[Any]] = deque()
    waited = [0.0]  # rank 0: seconds blocked on the last rank's updates
    began = time.perf_counter()

    if resume is not None:
        latents.update({int(b): t.to(device) for b, t in resume["latents"].items()})
        done.update({int(b): int(c) for b, c in resume["done"].items()})
        for b, kept in resume["versions"].items():
            versions[int(b)] = {int(c): t.to(device) for c, t in kept.items()}
        for b, state in resume["schedulers"].items():
            schedulers[int(b)] = copy.deepcopy(scheduler)
            restore_scheduler(schedulers[int(b)], state, device=device)
        for layer, name, key, value in resume["kv"]:
            cache.kv[(int(layer), name)] = (key.to(device), value.to(device))
        cache.extra_key_tokens = int(resume["context_key_tokens"])

    def state_after(n: int) -> dict[str, Any]:
        """This rank's part of the run after ``n`` iterations (see the docstring)."""
        kv = [] if config.context == "reference" else [
            [layer, name, key.detach().cpu().clone(), value.detach().cpu().clone()]
            for (layer, name), (key, value) in cache.kv.items()
        ]  # fmt: skip
        return {
            "iterations": n,
            "latents": {b: t.detach().cpu() for b, t in latents.items()},
            "done": dict(done),
            "versions": {b: {c: t.detach().cpu() for c, t in kept.items()} for b, kept in versions.items()},
            "schedulers": {b: scheduler_state(sch) for b, sch in schedulers.items()},
            "kv": kv,
            "context_key_tokens": cache.extra_key_tokens,
        }

    def take_updates(block: int, count: int) -> None:
        """Rank 0: receive the last rank's updates, in order, until ``block`` has ``count``."""
        start = time.perf_counter()
        while done.get(block, 0) < count:
            (b, s), received = posted.popleft()
            latents[b] = received.wait()[:, :, : sizes[b]].clone()
            done[b] = s + 1
            keep_version(b)
            post_receives()
        waited[0] += time.perf_counter() - start

    def run_item(k: int, b: int, s: int) -> None:
        """This rank's layers for block ``b`` at step ``s`` (iteration ``k``); the last rank also
        steps the block's scheduler and sends the update back to rank 0."""
        t = timesteps[s]
        stage = stages[step_expert[s]]
        tail = contexts[b]["input"]
        frames_in = len(tail) + sizes[b]
        shape = torch.Size((1, channels, frames_in, *latent_hw))
        if s == 0 and (first or last):
            latents[b] = block_noise(seed, b, longest, (channels, *latent_hw))[:, :, : sizes[b]].to(device)
            done[b] = 0
            if first:
                keep_version(b)
            if last:
                schedulers[b] = copy.deepcopy(scheduler)
        # which K/V this item stores and uses (rank-local, the same on every rank)
        if config.num_cat:
            n = min(config.num_cat, sizes[b])
            if config.context == "reference":  # own first frames, for the previous block, run next
                cache.store = (len(tail) * tokens_per_frame, (len(tail) + n) * tokens_per_frame)
                cache.store_as = (b, k)
                cache.use = (b + 1, k)
            else:
                cache.store = ((sizes[b] - n) * tokens_per_frame, sizes[b] * tokens_per_frame)
                cache.store_as = b
                cache.use = b - 1 if b > 0 else None
        cond = stage.conditions(t, text)
        rotary = stage.rotary(shape, starts[b] - len(tail))
        if first:
            if multi and s > 0:
                take_updates(b, s)
            need = min(s + 1 - config.tail_lag, steps)  # updates of block b - 1 its prefix shows
            if tail and multi:
                take_updates(b - 1, need)
            own = latents[b]
            model_in = torch.cat([versions[b - 1][need][:, :, -len(tail) :], own], dim=2) if tail else own
            hidden = stage.embed(model_in.to(dtype).expand(batch, -1, -1, -1, -1))
        else:
            hidden = hidden_ch.recv_prev()[:, : frames_in * tokens_per_frame]
        hidden = stage(hidden, cond, rotary)
        if config.context == "prev_kv" and s == steps - 1 and b > 0:
            cache.drop(b - 1)  # block b's last step was the last use of block b - 1's K/V
        if not last:
            _bounded(sends, hidden_ch.send_next_async(_padded_to(hidden, 1, max_input * tokens_per_frame)))
            return
        noise = stage.head(hidden, cond, shape)[:, :, len(tail) :]
        if batch == 2:
            noise = noise[1:] + guidance_scale * (noise[:1] - noise[1:])
        latents[b] = schedulers[b].step(noise, t, latents[b], return_dict=False)[0]
        done[b] = s + 1
        if first:
            keep_version(b)
        if s == steps - 1:
            del schedulers[b]
        if multi:
            _bounded(sends, back_ch.send_next_async(_padded_to(latents[b], 2, longest)))
        if not first and s == steps - 1:
            del latents[b]

    bar = tqdm(total=len(order), initial=items_before, desc="pipeline items", disable=not (progress and ctx.is_main))
    try:
        post_receives()
        for k in range(start_iteration, schedule.num_iterations):
            if config.context == "reference":
                cache.evict()  # the next-block K/V is only valid within its iteration
            for b, s in schedule.iteration(k):
                run_item(k, b, s)
                bar.update()
            if on_checkpoint is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == schedule.num_iterations):
                if first and multi:  # take this iteration's updates: none is left in flight to rank 0
                    for b, s in schedule.iteration(k):
                        take_updates(b, s + 1)
                on_checkpoint(k + 1, state_after(k + 1))
        if first and multi:
            for b in range(len(sizes)):
                take_updates(b, steps)
        while sends:
            sends.popleft().wait()
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    stats = {
        "denoise_s": time.perf_counter() - began,
        "items": len(order),
        "items_run": len(order) - items_before,
        "resumed_from_iteration": start_iteration,
        "stage": (lo, hi),
        "expert_steps": {attr: step_expert.count(attr) for attr in stages},
        "block_sizes": sizes,
        "context_key_tokens": cache.extra_key_tokens,
        "update_wait_s": waited[0],
    }
    if not first:
        return None, stats
    return torch.cat([latents[b] for b in range(len(sizes))], dim=2), stats
