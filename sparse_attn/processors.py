"""SVG2 sparse self-attention as diffusers attention processors (Wan 2.1, CogVideoX).

`apply_sparse_attention` swaps the processor of every video self-attention for an SVG2 one:
Wan's ``blocks[i].attn1`` (cross-attention to text stays dense) and CogVideoX's joint
text+video ``transformer_blocks[i].attn1`` (text tokens attend and are attended densely). Dense
warm-up follows the reference: the first ``dense_steps`` of denoising (from a progress callback,
as diffusers' pyramid attention broadcast reads ``pipe.current_timestep``) and the first
``dense_layers`` of blocks call the original processor object, so those calls are bit-identical
to the dense model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmaccel.runtime.adapters import wan
from mmaccel.runtime.patching import PatchHandle
from mmaccel.sparse_attn.svg2 import SparseAttentionState, SVG2Config, semantic_sparse_attention

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "SVG2CogVideoXAttnProcessor",
    "SVG2WanAttnProcessor",
    "SparseAttentionHandle",
    "SparseAttentionStats",
    "apply_sparse_attention",
    "pipeline_progress",
]

SUPPORTED_TRANSFORMERS = ("WanTransformer3DModel", "CogVideoXTransformer3DModel")


@dataclass
class SparseAttentionStats:
    """One record per self-attention call: layer, progress, backend ("dense" in warm-up),
    mask-weighted density, computed-block density, k-means and attention seconds."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Call counts, mean density over all calls (dense = 1) and over sparse calls, times."""
        sparse = [r for r in self.records if r["backend"] != "dense"]
        n = len(self.records)
        return {
            "calls": n,
            "sparse_calls": len(sparse),
            "backends": sorted({r["backend"] for r in self.records}),
            "density": sum(r["density"] for r in self.records) / n if n else float("nan"),
            "sparse_density": sum(r["density"] for r in sparse) / len(sparse) if sparse else float("nan"),
            "kmeans_s": sum(r["kmeans_s"] for r in sparse),
            "attention_s": sum(r["attention_s"] for r in sparse),
        }

    def clear(self) -> None:
        self.records.clear()


class _SVG2Processor:
    """Shared part: dense warm-up decision (by step progress and layer), state and stats."""

    def __init__(
        self,
        dense_processor: Any,
        layer_idx: int,
        num_layers: int,
        config: SVG2Config,
        progress: Callable[[], float] | None,
        stats: SparseAttentionStats,
    ) -> None:
        self.dense_processor = dense_processor
        self.layer_idx = layer_idx
        self.config = config
        self.progress = progress
        self.stats = stats
        self.state = SparseAttentionState()
        self.dense_layer = layer_idx < config.dense_layers * num_layers
        self._last_progress = -1.0

    def _current_progress(self) -> float | None:
        if self.progress is None:
            return None
        p = float(self.progress())
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"timestep_callback must return denoising progress in [0, 1], got {p!r}")
        if p < self._last_progress:  # a new generation started: its first sparse step cold-starts
            self.state.reset()
        self._last_progress = p
        return p

    def _is_dense(self, attention_mask: torch.Tensor | None) -> tuple[bool, float | None]:
        if attention_mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not implement attention masks")
        progress = self._current_progress()
        dense = self.dense_layer or (progress is not None and progress < self.config.dense_steps)
        if dense:
            self.stats.records.append(
                dict(layer=self.layer_idx, progress=progress, backend="dense", density=1.0,
                     block_density=None, kmeans_s=0.0, attention_s=0.0)
            )  # fmt: skip
        return dense, progress

    def _sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, progress: float | None, prefix: int = 0
    ) -> torch.Tensor:
        out = semantic_sparse_attention(q, k, v, self.config, self.state, dense_prefix=prefix)
        self.stats.records.append(dict(layer=self.layer_idx, progress=progress, **asdict(self.state.last)))
        return out


class SVG2WanAttnProcessor(_SVG2Processor):
    """Processor for a Wan self-attention: SVG2 sparse attention, or the original processor
    during dense warm-up (by step progress and by layer index)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise NotImplementedError("SVG2WanAttnProcessor handles self-attention (attn1) only")
        dense, progress = self._is_dense(attention_mask)
        if dense:
            return self.dense_processor(attn, hidden_states, None, None, rotary_emb)

        query, key, value = wan.project_qkv(attn, hidden_states, rotary=rotary_emb)
        out = self._sparse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), progress)
        return wan.project_out(attn, out.transpose(1, 2), query)


class SVG2CogVideoXAttnProcessor(_SVG2Processor):
    """Processor for CogVideoX's joint text+video attention: text tokens (first) attend and are
    attended densely, video-video attention is SVG2-sparse; dense warm-up as for Wan."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dense, progress = self._is_dense(attention_mask)
        if dense:
            return self.dense_processor(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)

        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = hidden_states.shape[0]
        query, key, value = (
            proj(hidden_states).view(b, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = self._sparse(query, key, value, progress, prefix=text_len)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, attn.inner_dim)))
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, encoder_out


class SparseAttentionHandle(PatchHandle):
    """`PatchHandle` that also exposes the run's ``stats`` and the per-layer ``processors``."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.stats = SparseAttentionStats()
        self.processors: list[_SVG2Processor] = []

    def reset_state(self) -> None:
        """Drop every layer's k-means centroids (the next sparse call cold-starts)."""
        for proc in self.processors:
            proc.state.reset()


def pipeline_progress(pipe: Any) -> Callable[[], float]:
    """Progress callback for a diffusers pipeline: index of ``pipe.current_timestep`` in
    ``pipe.scheduler.timesteps`` divided by their number (0 = first, noisiest step)."""

    def progress() -> float:
        t = pipe.current_timestep
        if t is None:
            raise RuntimeError("pipe.current_timestep is None: the pipeline is not denoising")
        steps = pipe.scheduler.timesteps
        hits = torch.nonzero(steps.to(torch.as_tensor(t).device) == t).flatten()
        if hits.numel() == 0:
            raise RuntimeError(f"timestep {t} is not in pipe.scheduler.timesteps")
        return int(hits[0]) / len(steps)

    return progress


def apply_sparse_attention(
    transformer: torch.nn.Module,
    config: SVG2Config,
    timestep_callback: Callable[[], float] | None = None,
) -> SparseAttentionHandle:
    """Install SVG2 sparse self-attention on a diffusers video transformer.

    ``timestep_callback`` returns the denoising progress in [0, 1] (e.g.
    ``pipeline_progress(pipe)``); it is required when ``config.dense_steps > 0``. Supported:
    ``WanTransformer3DModel`` and ``CogVideoXTransformer3DModel`` (others raise ``TypeError``).
    ``handle.remove()`` restores the original processors; ``handle.stats`` records density and
    timings per call.
    """
    if type(transformer).__name__ not in SUPPORTED_TRANSFORMERS:
        raise TypeError(
            f"apply_sparse_attention supports {', '.join(SUPPORTED_TRANSFORMERS)}; "
            f"got {type(transformer).__name__}"
        )
    if not isinstance(config, SVG2Config):
        raise TypeError(f"config must be an SVG2Config, got {type(config).__name__}")
    if config.dense_steps > 0 and timestep_callback is None:
        raise ValueError(
            f"config.dense_steps={config.dense_steps} needs a timestep_callback "
            "(e.g. pipeline_progress(pipe)); set dense_steps=0 to run sparse from the first step"
        )
    if timestep_callback is not None and not callable(timestep_callback):
        raise TypeError("timestep_callback must be a callable returning progress in [0, 1]")
    handle = SparseAttentionHandle(transformer, "sparse_attention")
    if type(transformer).__name__ == "WanTransformer3DModel":
        blocks, cls = transformer.blocks, SVG2WanAttnProcessor
    else:
        blocks, cls = transformer.transformer_blocks, SVG2CogVideoXAttnProcessor
    for i, block in enumerate(blocks):
        proc = cls(block.attn1.processor, i, len(blocks), config, timestep_callback, handle.stats)
        handle.processors.append(proc)
        handle.set_processor(block.attn1, proc)
    return handle
