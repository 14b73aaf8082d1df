"""Block-wise layer pipeline (DualParal, Wang et al. 2025, arXiv:2505.21070) for Wan.

The transformer's blocks are split into contiguous, balanced stages, one per rank; rank 0 also
runs the patch embedding, the last rank the output head, classifier-free guidance and the
scheduler step. The video is a queue of frame blocks at staggered noise levels
(:class:`~mmaccel.parallel_video.schedule.BlockSchedule`): every rank walks the same list of
``(block, step)`` work items, so blocks stream rank to rank through preallocated
:class:`~mmaccel.runtime.distributed.PipeChannel` buffers (hidden states ``[CFG batch, tokens, dim]``
forward, updated latents from the last rank back to rank 0).

Feature cache: in every layer, a block's queries also attend to the K/V of the previous block's
last ``num_cat`` latent frames, from the last time this rank computed that block (RoPE at their
own video positions, so the positional encoding extends across the seam). Coordinated noise: one
noise template of a block, reused as a frame-shuffled copy per block.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmaccel.parallel_video.clip_parallel import offset_rope
from mmaccel.parallel_video.noise import frame_noise, frame_seed
from mmaccel.parallel_video.schedule import BlockSchedule, split_stages
from mmaccel.runtime.adapters import wan
from mmaccel.runtime.distributed import CommHandle, DistContext, PipeChannel, gather_to_main
from mmaccel.runtime.patching import PatchHandle

__all__ = ["CachedContextAttnProcessor", "LayerPipelineConfig", "block_noise", "run_layer_pipeline"]

_MAX_PENDING_SENDS = 4


@dataclass(frozen=True)
class LayerPipelineConfig:
    """frames_per_block: latent frames per block (>= 1; must divide the video's latent frames).
    num_cat: latent frames of the previous block's K/V prepended in every layer (0..frames_per_block).
    """

    frames_per_block: int = 2
    num_cat: int = 1

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


@dataclass
class _CacheState:
    num_cat: int
    tokens_per_frame: int
    block: int = 0
    kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def evict(self, block: int) -> None:
        """Forget the K/V of ``block`` (once its successor has finished)."""
        for key in [k for k in self.kv if k[1] == block]:
            del self.kv[key]


class CachedContextAttnProcessor:
    """Self-attention of one frame block, with the previous block's cached K/V as extra keys."""

    def __init__(self, state: _CacheState, layer: int) -> None:
        self.state = state
        self.layer = layer

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
        st = self.state

        query, key, value = wan.project_qkv(attn, hidden_states, rotary=rotary_emb)
        context = st.kv.get((self.layer, st.block - 1))
        if st.num_cat:
            tail = st.num_cat * st.tokens_per_frame
            st.kv[(self.layer, st.block)] = (key[:, -tail:], value[:, -tail:])
        if context is not None:
            key, value = torch.cat([context[0], key], dim=1), torch.cat([context[1], value], dim=1)
        return wan.project_out(attn, wan.attention(attn, query, key, value), query)


def block_noise(seed: int, block: int, frames_per_block: int, frame_shape: tuple[int, int, int]) -> Tensor:
    """Coordinated noise: the block template ``frame_noise(seed, 0..fpb)`` with its frames shuffled
    by a permutation drawn from ``(seed, block)`` (block 0 keeps the template's order)."""
    template = frame_noise(seed, range(frames_per_block), frame_shape)
    if block == 0:
        return template
    generator = torch.Generator("cpu").manual_seed(frame_seed(seed, -1 - block))
    return template[:, :, torch.randperm(frames_per_block, generator=generator)]


def _conditions(transformer: Any, t: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``temb``, per-block modulation and projected text for timestep ``t`` (as ``forward`` does)."""
    temb, proj, text, _ = transformer.condition_embedder(t.expand(text.shape[0]), text, None)
    return temb, proj.unflatten(1, (6, -1)), text


def _head(transformer: Any, hidden: Tensor, temb: Tensor, latent_shape: torch.Size) -> Tensor:
    """Output norm, projection and unpatchify, as the end of ``WanTransformer3DModel.forward``."""
    _, _, frames, height, width = latent_shape
    p_t, p_h, p_w = transformer.config.patch_size
    shift, scale = (transformer.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = transformer.proj_out(hidden)
    hidden = hidden.reshape(hidden.shape[0], frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _bounded(pending: deque[CommHandle[Any]], handle: CommHandle[Any]) -> None:
    """Keep at most a few sends in flight (their tensors stay alive until completed)."""
    pending.append(handle)
    while len(pending) > _MAX_PENDING_SENDS:
        pending.popleft().wait()


@torch.no_grad()
def run_layer_pipeline(
    pipe: Any,
    ctx: DistContext,
    config: LayerPipelineConfig,
    *,
    text: Tensor,
    guidance_scale: float,
    num_latent_frames: int,
    latent_hw: tuple[int, int],
    steps: int,
    seed: int,
    progress: bool = True,
) -> tuple[Tensor | None, dict[str, Any]]:
    """Denoise a ``num_latent_frames``-frame video block-wise over the ranks' layer stages.

    ``text`` is ``[cond]`` or ``[cond, uncond]`` prompt embeddings (CFG batch); returns the
    latents ``(1, C, F, h, w)`` on rank 0 (``None`` elsewhere) and per-rank stats. Every rank must
    call it with the same arguments.
    """
    transformer = pipe.transformer
    fpb = config.frames_per_block
    if num_latent_frames % fpb:
        raise ValueError(f"frames_per_block={fpb} must divide the video's {num_latent_frames} latent frames")
    schedule = BlockSchedule(num_latent_frames // fpb, steps)
    lo, hi = split_stages(len(transformer.blocks), ctx.world_size)[ctx.rank]
    first, last = ctx.rank == 0, ctx.rank == ctx.world_size - 1
    device, dtype = ctx.device, transformer.dtype
    channels = transformer.config.in_channels
    block_shape = torch.Size((1, channels, fpb, *latent_hw))
    p_t, p_h, p_w = transformer.config.patch_size
    tokens_per_frame = (latent_hw[0] // p_h) * (latent_hw[1] // p_w)
    batch = text.shape[0]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps

    cache = _CacheState(num_cat=config.num_cat, tokens_per_frame=tokens_per_frame)
    handle = PatchHandle(transformer, "layer_pipeline")
    for i in range(lo, hi):
        handle.set_processor(transformer.blocks[i].attn1, CachedContextAttnProcessor(cache, i))
    multi = ctx.world_size > 1
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    hidden_ch = PipeChannel(ctx, (batch, fpb * tokens_per_frame, dim), dtype, tag=11) if multi else None
    # Rank 0 keeps receives for the last rank's latent updates posted ahead, so those sends always
    # complete: at most ~2 iterations of updates are produced but not yet consumed.
    back_buffers = (
        2 * max(schedule.in_flight(k) for k in range(schedule.num_iterations)) + _MAX_PENDING_SENDS + 2
    )
    back_ch = (
        PipeChannel(ctx, block_shape, torch.float32, ring=True, num_buffers=back_buffers, tag=12)
        if multi
        else None
    )
    expected = deque(item for item in schedule.order() if item[1] < steps - 1)  # updates rank 0 receives
    posted: deque[tuple[tuple[int, int], CommHandle[Tensor]]] = deque()

    def post_receives() -> None:
        while first and multi and expected and len(posted) < back_buffers - 1:
            posted.append((expected.popleft(), back_ch.recv_prev_async()))

    latents: dict[int, Tensor] = {}
    ready: dict[int, int] = {}  # rank 0: steps applied to its copy of each block's latents
    schedulers: dict[int, Any] = {}
    finished: dict[int, Tensor] = {}
    sends: deque[CommHandle[Any]] = deque()
    began = time.perf_counter()
    try:
        order = schedule.order()
        post_receives()
        for b, s in tqdm(order, desc="pipeline items", disable=not (progress and ctx.is_main)):
            t = timesteps[s]
            cache.block = b
            temb, proj, context = _conditions(transformer, t, text)
            rotary = offset_rope(transformer.rope, block_shape, b * fpb)
            if s == 0 and (first or last):
                latents[b] = block_noise(seed, b, fpb, (channels, *latent_hw)).to(device)
                ready[b] = 0
            if first:
                if s > 0 and multi:
                    while ready.get(b) != s:  # take the last rank's updates, in order, until block b's
                        (done_b, done_s), received = posted.popleft()
                        latents[done_b] = received.wait().clone()
                        ready[done_b] = done_s + 1
                        post_receives()
                model_input = latents[b].to(dtype).expand(batch, -1, -1, -1, -1)
                hidden = transformer.patch_embedding(model_input).flatten(2).transpose(1, 2).contiguous()
            else:
                hidden = hidden_ch.recv_prev()
            for i in range(lo, hi):
                hidden = transformer.blocks[i](hidden, context, proj, rotary)
            if first and not last and s == steps - 1:
                del latents[b]
            if not last:
                _bounded(sends, hidden_ch.send_next_async(hidden.contiguous()))
            else:
                noise = _head(transformer, hidden, temb, block_shape)
                if batch == 2:
                    noise = noise[1:] + guidance_scale * (noise[:1] - noise[1:])
                if s == 0:
                    schedulers[b] = copy.deepcopy(scheduler)
                latents[b] = schedulers[b].step(noise, t, latents[b], return_dict=False)[0]
                if s == steps - 1:
                    finished[b] = latents.pop(b)
                    del schedulers[b]
                elif multi:
                    _bounded(sends, back_ch.send_next_async(latents[b]))
            if s == steps - 1 and b > 0:
                cache.evict(b - 1)
        while sends:
            sends.popleft().wait()
    finally:
        handle.remove()
    stats = {"denoise_s": time.perf_counter() - began, "items": len(order), "stage": (lo, hi)}
    video = torch.cat([finished[b] for b in range(schedule.num_blocks)], dim=2) if last else None
    if not multi:
        return video, stats
    outgoing = (
        video.movedim(2, 0).contiguous()
        if last
        else torch.empty((0, *block_shape[:2], *latent_hw), device=device)
    )
    gathered = gather_to_main(ctx, outgoing)
    if not ctx.is_main:
        return None, stats
    return torch.cat(gathered).movedim(0, 2), stats
