"""SVG2: semantic-aware sparse attention for video diffusion transformers.

Sparse VideoGen2 (Yang et al., 2025, arXiv:2505.18875): per (batch, head), cluster Q and K with
k-means, score cluster pairs by ``C_q C_k^T / sqrt(d)`` with a size-weighted softmax, keep per
query cluster the smallest set of key clusters whose mass reaches ``top_p`` (plus the top
``min_kc_ratio`` of clusters), permute tokens so clusters are contiguous, run block-sparse
attention over the selected cluster pairs and undo the permutation.

This file holds the whole technique: `SVG2Config`, the attention function
(`semantic_sparse_attention`), the diffusers attention processors for Wan 2.1
(`SVG2WanAttnProcessor`: ``blocks[i].attn1``; cross-attention to text stays dense) and CogVideoX
(`SVG2CogVideoXAttnProcessor`: joint text+video ``transformer_blocks[i].attn1``, text attends and
is attended densely), HunyuanVideo (`SVG2HunyuanVideoAttnProcessor`: the same with the text last
and its padding masked; preset `SVG2Config.hunyuan_video`), `apply_svg2` and its `SVG2Handle` /
`SVG2Stats`. Dense warm-up follows the
reference code: the first ``floor(dense_steps * steps)`` denoising steps (counted in the
scheduler's timesteps) and the first ``floor(dense_layers * layers)`` blocks run dense.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from mmaccel.runtime.adapters import cogvideox, hunyuan_video, wan
from mmaccel.runtime.configs import resolve_config
from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats
from mmaccel.runtime.timesteps import check_timestep_callback, read_timestep, step_position
from mmaccel.sparse_attn.backends import (
    BACKENDS,
    FLEX_KERNELS,
    LAYOUTS,
    ClusterLayout,
    flex_attention_available,
    flex_block_sparse,
    masked_block_sparse,
    reference_block_sparse,
)
from mmaccel.sparse_attn.kmeans import KMEANS_BACKENDS, KMeansResult, kmeans, kmeans_rounds
from mmaccel.sparse_attn.tile_select import num_tiles, query_tile_union, tile_groups

__all__ = [
    "PRESETS",
    "SUPPORTED_TRANSFORMERS",
    "AttentionInfo",
    "Clustering",
    "KMeansStart",
    "Preset",
    "SVG2CogVideoXAttnProcessor",
    "SVG2Config",
    "SVG2Handle",
    "SVG2HunyuanVideoAttnProcessor",
    "SVG2Stats",
    "SVG2WanAttnProcessor",
    "SparseAttentionState",
    "apply_svg2",
    "cluster_means",
    "cluster_sparse_attention",
    "dense_layer_count",
    "dense_step_count",
    "mask_density",
    "min_kept_clusters",
    "select_clusters",
    "semantic_sparse_attention",
    "tile_cluster_counts",
]


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _fraction(name: str, value: object, interval: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in {interval}, got {type(value).__name__}")
    low_ok = value > 0 if interval.startswith("(") else value >= 0
    if math.isnan(value) or not low_ok or value > 1:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class SVG2Config:
    """Knobs of semantic sparse attention (defaults: the reference Wan 2.1 settings).

    num_q_clusters / num_k_clusters: k-means clusters for queries / keys (reference at 720p,
        ~76K tokens: 300 / 1000; scale with the sequence length; at most the token count).
    top_p: attention mass each query cluster keeps, in (0, 1].
    min_kc_ratio: fraction of key clusters always kept per query cluster (the top ones), [0, 1];
        ``max(1, floor(min_kc_ratio * num_k_clusters))`` clusters, as the reference rounds.
    kmeans_init_iters / kmeans_iters: iterations of a cold start / of a warm start, always run
        in full by default (no host read of the convergence test).
    kmeans_tol: None (default) or an early stop once no centroid moves more than this (the
        reference's 1e-4); eager calls then read the shift on the host every iteration.
    kmeans_backend: "torch" (batched Lloyd here, any device, no host sync) or "flash_kmeans"
        (the authors' Triton k-means, PyPI ``flash-kmeans``; CUDA only, raises when missing).
    dense_steps / dense_layers: fraction of the denoising steps / of the blocks run dense at the
        start, each in [0, 1]; ``floor(fraction * count)`` of them, as the reference rounds
        (`dense_step_count`, `dense_layer_count`; used by `apply_svg2`).
    backend: "auto" (flex for >= ``flex_min_tokens`` queries when available, else masked),
        "flex", "masked" (token-mask SDPA, small sizes) or "reference" (per-cluster gather).
    q_block_size / kv_block_size: flex tiles (tokens; powers of two >= 16): 128 x 64 by
        default, inductor's Triton tiles on Hopper; 128 x 128 for the FLASH kernel.
    layout: flex token layout, "padded" (each cluster padded to whole tiles; measured faster
        on the CPU) or "unpadded" (clusters contiguous, no padding; a tile spanning several
        clusters takes a token-label mask) or "tiles" (our option, `mmaccel.sparse_attn.tile_select`:
        the cluster-sorted tokens cut into tiles; key tiles are the selection units, a query tile
        takes its clusters' union; no padding, no element mask but a short last tile's; the
        selection and the state's labels / counts are the tiles').
    flex_kernel: "triton" (inductor's flex kernel) or "flash" (flex's FLASH backend, the
        ``flash-attn-4`` wheel; CUDA, 128 x 128 tiles).
    profile: record timings and per-call host numbers (``SVG2Stats.records``, the seconds in
        ``state.last``); each eager call then synchronises the device. Off by default: a sparse
        step reads nothing back to the host.
    seed: seed of the random k-means initialisation.
    """

    num_q_clusters: int = 300
    num_k_clusters: int = 1000
    top_p: float = 0.9
    min_kc_ratio: float = 0.10
    kmeans_init_iters: int = 50
    kmeans_iters: int = 2
    kmeans_tol: float | None = None
    kmeans_backend: str = "torch"
    dense_steps: float = 0.2
    dense_layers: float = 0.03
    backend: str = "auto"
    q_block_size: int = 128
    kv_block_size: int = 64
    layout: str = "padded"
    flex_kernel: str = "triton"
    flex_min_tokens: int = 1024
    profile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _int("num_q_clusters", self.num_q_clusters, 1)
        _int("num_k_clusters", self.num_k_clusters, 1)
        _fraction("top_p", self.top_p, "(0, 1]")
        _fraction("min_kc_ratio", self.min_kc_ratio, "[0, 1]")
        _int("kmeans_init_iters", self.kmeans_init_iters, 1)
        _int("kmeans_iters", self.kmeans_iters, 1)
        if self.kmeans_tol is not None:
            if isinstance(self.kmeans_tol, bool) or not isinstance(self.kmeans_tol, (int, float)):
                raise TypeError(f"kmeans_tol must be None or a float >= 0, got {type(self.kmeans_tol).__name__}")
            if not 0 <= self.kmeans_tol < math.inf:
                raise ValueError(f"kmeans_tol must be None or a finite float >= 0, got {self.kmeans_tol!r}")
        _choice("kmeans_backend", self.kmeans_backend, KMEANS_BACKENDS)
        _fraction("dense_steps", self.dense_steps, "[0, 1]")
        _fraction("dense_layers", self.dense_layers, "[0, 1]")
        _choice("backend", self.backend, BACKENDS)
        for name in ("q_block_size", "kv_block_size"):
            value = getattr(self, name)
            _int(name, value, 16)
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        _choice("layout", self.layout, LAYOUTS)
        _choice("flex_kernel", self.flex_kernel, FLEX_KERNELS)
        if self.flex_kernel == "flash" and (self.q_block_size, self.kv_block_size) != (128, 128):
            raise ValueError(
                "flex_kernel='flash' needs q_block_size = kv_block_size = 128, got "
                f"{self.q_block_size}, {self.kv_block_size}"
            )
        _int("flex_min_tokens", self.flex_min_tokens, 1)
        if not isinstance(self.profile, bool):
            raise TypeError(f"profile must be a bool, got {type(self.profile).__name__}")
        _int("seed", self.seed, 0)

    @classmethod
    def preset(cls, name: str, *, tile_sized: bool = False, **overrides: Any) -> SVG2Config:
        """The authors' settings for a model and resolution (`PRESETS`), with ``overrides``
        (any field) on top: ``SVG2Config.preset("wan2.1-14b-720p", backend="flex")``.

        ``tile_sized=True`` (our option): cluster counts from `tile_cluster_counts` for the
        preset's tokens and the config's tiles, so the padded layout pads at most ~25%."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        config = cls(**{**PRESETS[name].settings, **overrides})
        if not tile_sized:
            return config
        cq, ck = tile_cluster_counts(PRESETS[name].tokens, config.q_block_size, config.kv_block_size)
        return replace(config, num_q_clusters=cq, num_k_clusters=ck)


def tile_cluster_counts(tokens: int, q_block: int, kv_block: int, max_padding: float = 0.25) -> tuple[int, int]:
    """Query / key cluster counts whose expected padding in the padded layout is at most
    ``max_padding`` of the tokens: a cluster pads on average ``(block - 1) / 2`` tokens, so
    ``C = floor(2 max_padding tokens / (block - 1))`` (at least 1)."""
    _int("tokens", tokens, 1)
    _fraction("max_padding", max_padding, "(0, 1]")
    return tuple(max(1, min(tokens, int(2 * max_padding * tokens / (b - 1)))) for b in (q_block, kv_block))


@dataclass(frozen=True)
class Preset:
    """A model at a resolution: its video tokens (``grid`` = latent frames x rows x cols after
    patchify), its attention heads x head dim, and the authors' SVG2 settings for it."""

    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    settings: dict[str, Any]
    source: str

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


_AUTHORS = dict(num_q_clusters=300, num_k_clusters=1000, top_p=0.9, min_kc_ratio=0.10, kmeans_init_iters=50,
                kmeans_iters=2, dense_steps=0.2, dense_layers=0.03)  # fmt: skip
#: the authors' settings (svg-project/Sparse-VideoGen scripts), by model and resolution
PRESETS: dict[str, Preset] = {
    "wan2.1-1.3b-480p": Preset(
        (21, 30, 52), 12, 128, _AUTHORS,
        "Wan 2.1 T2V 1.3B, 832 x 480, 81 frames: the Wan script's flags (300 / 1000 clusters, top-p 0.9, "
        "min_kc 0.10, k-means 50 / 2 iterations, first 20% of steps and 3% of layers dense)",
    ),
    "wan2.1-14b-720p": Preset(
        (21, 45, 80), 40, 128, _AUTHORS,
        "Wan 2.1 T2V 14B, 1280 x 720, 81 frames: the paper's Wan 720p setting (300 / 1000 clusters at "
        "75,600 tokens, top-p 0.9, first 20% of steps and 3% of layers dense)",
    ),
    "hunyuanvideo-720p": Preset(
        (33, 45, 80), 24, 128, {**_AUTHORS, "num_q_clusters": 400, "dense_steps": 0.1},
        "HunyuanVideo, 1280 x 720, 129 frames: the authors' scripts/hyvideo/hyvideo_t2v_720p_sap.sh "
        "(400 / 1000 clusters, top-p 0.9, min_kc 0.10, k-means 50 / 2, first 10% of steps and 3% of blocks dense)",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class AttentionInfo:
    """What one sparse attention call did: the backend that ran, the mask-weighted density
    (``sum(mask * |Q_i| |K_j|) / (Sq Sk)``) and the computed tile fraction (flex only) as 0-dim
    device tensors, read on the host only when ``density`` / ``block_density`` are read; timings
    (seconds) only with ``SVG2Config(profile=True)``, else None."""

    backend: str
    density_tensor: torch.Tensor
    block_density_tensor: torch.Tensor | None
    kmeans_s: float | None
    attention_s: float | None
    kmeans_iterations: tuple[int, int]
    warm_start: bool

    @property
    def density(self) -> float:
        """Mask-weighted density (a host read of the device value)."""
        return float(self.density_tensor)

    @property
    def block_density(self) -> float | None:
        """Computed tile fraction, padding and unselected pairs in computed tiles included
        (flex only; above 1 it computes more than dense)."""
        return None if self.block_density_tensor is None else float(self.block_density_tensor)

    def as_record(self) -> dict[str, Any]:
        """Host numbers of this call (reads the device values)."""
        return dict(backend=self.backend, density=self.density, block_density=self.block_density,
                    kmeans_s=self.kmeans_s, attention_s=self.attention_s,
                    kmeans_iterations=self.kmeans_iterations, warm_start=self.warm_start)  # fmt: skip


@dataclass(frozen=True, eq=False)
class Clustering:
    """One sparse call's decisions: the k-means labels (B*H, S) and cluster sizes (B*H, C) of the
    queries and of the keys, and the selected (query cluster, key cluster) pairs (B*H, Cq, Ck).
    Given to `semantic_sparse_attention`, they replace its k-means and selection (the recompute
    of a checkpointed forward takes its forward's)."""

    q_labels: torch.Tensor
    q_counts: torch.Tensor
    k_labels: torch.Tensor
    k_counts: torch.Tensor
    selected: torch.Tensor


@dataclass(frozen=True, eq=False)
class KMeansStart:
    """How a layer's next sparse call starts k-means of its queries and of its keys (each field a
    ``(queries, keys)`` pair), made ahead by `apply_svg2`'s pre-forward hook, outside any
    compiled region, for ``tokens`` video tokens in ``rows`` (batch x heads) rows.

    ``cold``: whether the job cold-starts, as host values (eager calls branch on them) and as
    0-d bool CPU tensors ``cold_flags``; ``iterations``: its Lloyd rounds (``kmeans_init_iters``
    cold, ``kmeans_iters`` warm) as 0-d long CPU tensors; ``indices`` (rows, C) long: the cold
    start's random tokens (`_draw_indices`; any valid tokens when warm); ``centroids`` (rows, C,
    D) float32: the stored centroids to warm-start from (zeros when cold). A compiled call reads
    only the tensors, ``init = where(cold_flag, x[indices], centroids)`` and ``iterations`` Lloyd
    rounds as data (`kmeans_rounds`), so a cold and a warm call are one program."""

    tokens: int
    rows: int
    cold: tuple[bool, bool]
    cold_flags: tuple[torch.Tensor, torch.Tensor]
    iterations: tuple[torch.Tensor, torch.Tensor]
    indices: tuple[torch.Tensor, torch.Tensor]
    centroids: tuple[torch.Tensor, torch.Tensor]

    def fits(self, rows: int, tokens: int, head_dim: int, device: torch.device) -> bool:
        """Whether it was made for a call of these rows, video tokens, head dim and device."""
        return (self.rows, self.tokens) == (rows, tokens) and all(
            c.shape[2] == head_dim and c.device == device for c in self.centroids
        )


@dataclass
class SparseAttentionState:
    """Per-layer k-means memory: the last Q / K centroids (B*H, C, D), reused as warm start.

    Consecutive calls on the same layer (later denoising steps, the CFG passes of one step)
    share it. ``q_labels`` / ``k_labels`` (B*H, S), ``q_counts`` / ``k_counts`` (B*H, C) and
    ``selected`` (B*H, Cq, Ck) are the latest call's clustering and selection (`clustering`),
    ``density`` (0-dim tensor) and ``backend`` its mask-weighted density and kernel. ``last`` (an
    `AttentionInfo`; its densities are read lazily, its timings filled only with
    ``profile=True``) and ``calls`` are updated by eager calls only. ``start`` is how the next
    call's k-means starts (`KMeansStart`), made ahead by `apply_svg2`'s pre-forward hook and
    taken by the call it fits.
    """

    q_centroids: torch.Tensor | None = None
    k_centroids: torch.Tensor | None = None
    q_labels: torch.Tensor | None = None
    k_labels: torch.Tensor | None = None
    q_counts: torch.Tensor | None = None
    k_counts: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    last: AttentionInfo | None = None
    calls: int = field(default=0)
    density: torch.Tensor | None = None
    backend: str | None = None
    start: KMeansStart | None = None

    def reset(self) -> None:
        """Forget everything (the next call cold-starts), e.g. before a new video."""
        self.q_centroids = self.k_centroids = self.last = None
        self.q_labels = self.k_labels = self.q_counts = self.k_counts = self.selected = None
        self.density = self.backend = self.start = None
        self.calls = 0

    def clustering(self) -> Clustering | None:
        """The latest call's `Clustering`, None before any call."""
        if self.selected is None:
            return None
        return Clustering(self.q_labels, self.q_counts, self.k_labels, self.k_counts, self.selected)


def min_kept_clusters(min_kc_ratio: float, num_k_clusters: int) -> int:
    """Key clusters every query cluster keeps at least: ``max(1, floor(ratio * clusters))``
    (the reference's ``int(min_kc_ratio * kc_num)``, and its always-kept top cluster)."""
    return max(1, int(min_kc_ratio * num_k_clusters))


def dense_step_count(dense_steps: float, num_steps: int) -> int:
    """Denoising steps run dense at the start: ``floor(dense_steps * num_steps)`` (reference)."""
    return math.floor(dense_steps * num_steps)


def dense_layer_count(dense_layers: float, num_layers: int) -> int:
    """Blocks run dense at the bottom: ``floor(dense_layers * num_layers)`` (reference)."""
    return math.floor(dense_layers * num_layers)


def select_clusters(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    k_counts: torch.Tensor,
    top_p: float,
    min_kc_ratio: float,
) -> torch.Tensor:
    """Selected (query cluster, key cluster) pairs: bool (N, Cq, Ck).

    Scores ``C_q C_k^T / sqrt(d)`` with the size-weighted softmax ``|K_j| e^{S_ij} / sum``;
    per query cluster the smallest top set reaching ``top_p`` (the crossing cluster kept) plus
    the top `min_kept_clusters` clusters. Empty key clusters carry no mass.
    """
    scores = q_centroids @ k_centroids.transpose(-1, -2) / math.sqrt(q_centroids.shape[-1])
    logits = scores + k_counts.float().log().unsqueeze(-2)  # log |K_j|; empty clusters -> -inf
    min_keep = min_kept_clusters(min_kc_ratio, k_centroids.shape[-2])
    return _top_p_on_device(logits, top_p, min_keep)


def _top_p_on_device(logits: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    """`mmaccel.runtime.budget.top_p_mask` on logits without its host-side input checks, which
    read tensor values (same arithmetic and result; tested against it)."""
    mass = logits.double().softmax(-1)
    sorted_mass, order = mass.sort(dim=-1, descending=True, stable=True)
    before = sorted_mass.cumsum(-1) - sorted_mass
    keep = before < p - 1e-6
    keep[..., : min(min_keep, logits.shape[-1])] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def mask_density(selected: torch.Tensor, q_counts: torch.Tensor, k_counts: torch.Tensor) -> float:
    """Mask-weighted density ``sum(mask_ij |Q_i| |K_j|) / sum(|Q_i| |K_j|)``, averaged over rows
    (a host read; the hot path keeps the tensor)."""
    return float(_mask_density(selected, q_counts, k_counts))


def _mask_density(selected: torch.Tensor, q_counts: torch.Tensor, k_counts: torch.Tensor) -> torch.Tensor:
    qc, kc = q_counts.double(), k_counts.double()
    kept = torch.einsum("nij,ni,nj->n", selected.double(), qc, kc)
    return (kept / (qc.sum(-1) * kc.sum(-1))).mean()


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SVG2Config, dense_prefix: int = 0
) -> None:
    if not isinstance(config, SVG2Config):
        raise TypeError(f"config must be an SVG2Config, got {type(config).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "shapes must be q (B, H, Sq, D), k (B, H, Sk, D), v (B, H, Sk, Dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if isinstance(dense_prefix, bool) or not isinstance(dense_prefix, int) or dense_prefix < 0:
        raise ValueError(f"dense_prefix must be an int >= 0, got {dense_prefix!r}")
    if dense_prefix and (q.shape[2] != k.shape[2] or dense_prefix >= q.shape[2]):
        raise ValueError(
            f"dense_prefix={dense_prefix} needs joint attention (Sq == Sk) with more tokens than the prefix; "
            f"got Sq={q.shape[2]}, Sk={k.shape[2]}"
        )
    if config.num_q_clusters > q.shape[2] - dense_prefix:
        raise ValueError(
            f"num_q_clusters={config.num_q_clusters} exceeds the {q.shape[2] - dense_prefix} query tokens"
        )
    if config.num_k_clusters > k.shape[2] - dense_prefix:
        raise ValueError(
            f"num_k_clusters={config.num_k_clusters} exceeds the {k.shape[2] - dense_prefix} key tokens"
        )


def _choose_backend(config: SVG2Config, num_queries: int) -> str:
    if config.backend == "flex":
        if not flex_attention_available():
            raise RuntimeError("backend='flex' needs torch.nn.attention.flex_attention and torch.compile")
        return "flex"
    if config.backend == "auto":
        return "flex" if num_queries >= config.flex_min_tokens and flex_attention_available() else "masked"
    return config.backend


def _clock(device: torch.device, profile: bool) -> float | None:
    """With ``profile``: host time after the device finished (a sync). None without it and
    under ``torch.compile`` (no timing there)."""
    if not profile or torch.compiler.is_compiling():
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


#: a cold start's random draw: (seed, first, local, total, ((rows, tokens, clusters), ...)), see `_draw_key`
_DrawKey = tuple[int, int, int, int, tuple[tuple[int, int, int], ...]]


def _draw_key(jobs: list[tuple[int, int, int]], seed: int, heads: tuple[int, int, int] | None) -> _DrawKey:
    """What a cold start's draw depends on: the ``(rows, tokens, clusters)`` of each cold job in
    order, the seed and the head share ``(first, local, total)`` (None: all heads, as one share of
    one head per row)."""
    first, local, total = (0, 1, 1) if heads is None else heads
    return (seed, first, local, total, tuple(jobs))


@torch.compiler.disable
def _draw_indices(key: _DrawKey) -> list[torch.Tensor]:
    """The tokens a cold start takes as centroids: per job, ``clusters`` distinct random token
    indices per row, (rows, clusters) long on the CPU, from one CPU generator seeded with the
    key's seed (a host draw, outside any compiled graph).

    Rows are heads ``first .. first + local`` of ``total`` per sample (a context-parallel rank's
    share after Ulysses' all-to-all): the draw is made for all ``total`` heads and this share's
    rows are kept, so every head starts from the same tokens as in one process."""
    seed, first, local, total, jobs = key
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n, s, c in jobs:
        if not 1 <= c <= s:
            raise ValueError(f"num_clusters must be in [1, {s}] (the number of tokens), got {c}")
        noise = torch.rand(n // local * total, s, generator=generator).view(n // local, total, s)
        out.append(noise[:, first : first + local].reshape(n, s).argsort(dim=1)[:, :c])
    return out


def _initial_centroids(
    jobs: list[tuple[torch.Tensor, int]], seed: int, heads: tuple[int, int, int] | None = None
) -> list[torch.Tensor]:
    """Cold-start centroids (random distinct tokens, `_draw_indices`) for each ``(tokens,
    clusters)`` job, in order, seeded with ``seed``; ``heads = (first, local, total)`` as there.
    A call without a `KMeansStart` draws here; `apply_svg2`'s pre-forward hook draws the same
    tokens ahead (the draw depends on its key only)."""
    if not jobs:
        return []
    key = _draw_key([(x.shape[0], x.shape[1], c) for x, c in jobs], seed, heads)
    with _outside_the_trace() if torch.compiler.is_exporting() else contextlib.nullcontext():
        indices = _draw_indices(key)  # under export: constants of the program, not a traced generator
    return [_gather(x, idx) for (x, _), idx in zip(jobs, indices)]


def _clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    q_counts: torch.Tensor,
    k_counts: torch.Tensor,
    selected: torch.Tensor,
    config: SVG2Config,
    one_group_per_tile: bool = False,
) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """Run the chosen block-sparse backend over the selected cluster pairs; the computed tile
    fraction (a 0-dim tensor) for flex, None otherwise. ``one_group_per_tile``: the labels are
    the tiles layout's groups alone (no dense prefix group), `flex_block_sparse`'s fast path."""
    b, h = q.shape[:2]
    layout = ClusterLayout(
        q_labels.view(b, h, -1), k_labels.view(b, h, -1), q_counts.view(b, h, -1), k_counts.view(b, h, -1)
    )
    sel = selected.view(b, h, *selected.shape[1:])
    backend = _choose_backend(config, q.shape[2])
    if backend == "flex":
        out, block_density = flex_block_sparse(
            q, k, v, layout, sel, config.q_block_size, config.kv_block_size, config.layout == "padded",
            config.flex_kernel, one_group_per_tile=one_group_per_tile,
        )  # fmt: skip
        return out, backend, block_density
    fn = masked_block_sparse if backend == "masked" else reference_block_sparse
    return fn(q, k, v, layout, sel), backend, None


def cluster_means(
    x: torch.Tensor, labels: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (N, C, D) float32 (zeros for empty clusters) and counts (N, C) of given labels."""
    n, _, d = x.shape
    sums = torch.zeros(n, num_clusters, d, device=x.device).scatter_add_(
        1, labels.unsqueeze(-1).expand(-1, -1, d), x.float()
    )
    counts = torch.zeros(n, num_clusters, dtype=torch.long, device=x.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def cluster_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    config: SVG2Config,
) -> tuple[torch.Tensor, AttentionInfo]:
    """Sparse attention for given clusterings (B, H, Sq) / (B, H, Sk) with labels in
    ``[0, num_q_clusters)`` / ``[0, num_k_clusters)``: the SVG2 selection and kernels without
    k-means, e.g. for a positional (contiguous-block) baseline. Returns output and info (timings only with ``profile=True``)."""
    _check_inputs(q, k, v, config)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if q_labels.shape != (b, h, sq) or k_labels.shape != (b, h, sk):
        raise ValueError(f"labels must be {(b, h, sq)} and {(b, h, sk)}, got {tuple(q_labels.shape)}, "
                         f"{tuple(k_labels.shape)}")  # fmt: skip
    ql, kl = q_labels.reshape(b * h, sq), k_labels.reshape(b * h, sk)
    cq, nq = cluster_means(q.reshape(b * h, sq, d), ql, config.num_q_clusters)
    if config.layout == "tiles":  # the given clusters order the tokens, key tiles are the units
        tq, tk = tile_groups(q.reshape(b * h, sq, d), ql, config.q_block_size, centroids=False), tile_groups(
            k.reshape(b * h, sk, d), kl, config.kv_block_size)  # fmt: skip
        selected = query_tile_union(select_clusters(cq, tk.centroids, tk.counts, config.top_p, config.min_kc_ratio),
                                    tq, nq)  # fmt: skip
        ql, nq, kl, nk = tq.labels, tq.counts, tk.labels, tk.counts
    else:
        ck, nk = cluster_means(k.reshape(b * h, sk, d), kl, config.num_k_clusters)
        selected = select_clusters(cq, ck, nk, config.top_p, config.min_kc_ratio)
    t0 = _clock(q.device, config.profile)
    out, backend, block_density = _clustered_attention(
        q, k, v, ql, kl, nq, nk, selected, config, one_group_per_tile=config.layout == "tiles"
    )
    t1 = _clock(q.device, config.profile)
    seconds = None if t0 is None else t1 - t0
    info = AttentionInfo(backend, _mask_density(selected, nq, nk), block_density, None, seconds, (0, 0), False)
    return out, info


def semantic_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SVG2Config,
    state: SparseAttentionState | None = None,
    *,
    dense_prefix: int = 0,
    prefix_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    heads: tuple[int, int] | None = None,
    prefix_mask: torch.Tensor | None = None,
    clustering: Clustering | None = None,
) -> torch.Tensor:
    """SVG2 attention for ``q`` (B, H, Sq, D), ``k`` (B, H, Sk, D), ``v`` (B, H, Sk, Dv).

    Same layout and result type as ``F.scaled_dot_product_attention`` (scale ``1/sqrt(D)``,
    no mask). ``state`` carries the k-means centroids between calls (warm start) and receives
    an `AttentionInfo` in ``state.last``. With ``top_p=1`` and ``min_kc_ratio=1`` every pair is
    kept and the output equals dense attention up to float rounding.

    ``dense_prefix``: in joint attention (text tokens first, then video, Sq == Sk), the first
    ``dense_prefix`` tokens attend to everything and every query attends to them; only the
    video-video part is clustered and sparse. ``prefix_attention(q, k, v)`` computes those dense
    rows (``(B, H, S, D)`` in and out; default ``F.scaled_dot_product_attention``).
    ``prefix_mask`` (bool ``(B, dense_prefix)``): the prefix keys the video queries see (padded
    text tokens False, as HunyuanVideo's key mask); computed on the device, no host read.

    ``heads = (first, total)``: ``q``'s ``H`` heads are heads ``first .. first + H`` of a model
    with ``total`` heads (context parallelism: one rank's share); k-means cold starts then draw
    exactly the centroids the one-process run draws for those heads.

    ``clustering``: the `Clustering` to attend with instead of running k-means and the selection
    (the recompute of a checkpointed forward, which takes its forward's); ``state`` is then
    neither read nor updated. k-means clusters detached queries and keys: its decisions carry
    no gradient, and a backward saves only the attention's tensors.
    """
    _check_inputs(q, k, v, config, dense_prefix)
    state = SparseAttentionState() if state is None else state
    b, h, sq, d = q.shape
    sk, n = k.shape[2], dense_prefix
    if clustering is not None:
        _check_clustering(clustering, b * h, sq - n, sk - n, config)
        return _attend(q, k, v, config, clustering, dense_prefix, prefix_attention, prefix_mask)[0]
    qf, kf = (x[:, :, n:].detach().reshape(b * h, x.shape[2] - n, d) for x in (q, k))

    t0 = _clock(q.device, config.profile)
    start = state.start
    if start is not None and not start.fits(b * h, sq - n, d, q.device):
        start = None
    if start is not None and torch.compiler.is_compiling() and config.kmeans_backend == "torch":
        # one program for cold and warm: the start's tensors decide (`KMeansStart`)
        kq, kk = (
            kmeans_rounds(x, torch.where(cold, _gather(x, idx), stored), rounds, tol=config.kmeans_tol)
            for x, cold, idx, stored, rounds in zip(
                (qf, kf), start.cold_flags, start.indices, start.centroids, start.iterations
            )
        )
        warm = None  # data here
    else:
        share = None if heads is None else (heads[0], h, heads[1])
        kq, kk, warm = _host_kmeans(qf, kf, config, state, start, share)
    if not torch.compiler.is_exporting():  # an exported program keeps no k-means memory
        state.q_centroids, state.k_centroids = kq.centroids, kk.centroids
    uq, uk = kq, kk
    if config.layout == "tiles":  # key tiles are the selection units, a query tile its clusters' union
        uq = tile_groups(qf, kq.labels, config.q_block_size, centroids=False)
        uk = tile_groups(kf, kk.labels, config.kv_block_size)
    selected = select_clusters(kq.centroids, uk.centroids, uk.counts, config.top_p, config.min_kc_ratio)
    if config.layout == "tiles":
        selected = query_tile_union(selected, uq, kq.counts)
    t1 = _clock(q.device, config.profile)
    clustering = Clustering(uq.labels, uq.counts, uk.labels, uk.counts, selected)
    out, backend, block_density, density = _attend(
        q, k, v, config, clustering, dense_prefix, prefix_attention, prefix_mask
    )
    t2 = _clock(q.device, config.profile)
    # a start serves one call. Every state write comes after k-means: under torch 2.13's dynamo,
    # an attribute written before a while_loop loses the object's writes after it
    state.start = None
    if torch.compiler.is_exporting():
        return out
    state.density, state.backend = density, backend
    state.q_labels, state.k_labels, state.selected = uq.labels, uk.labels, selected
    state.q_counts, state.k_counts = uq.counts, uk.counts
    if not torch.compiler.is_compiling():  # eager: the call's info, densities still on the device
        state.calls += 1
        state.last = AttentionInfo(
            backend=backend,
            density_tensor=state.density,
            block_density_tensor=block_density,
            kmeans_s=None if t0 is None else t1 - t0,
            attention_s=None if t0 is None else t2 - t1,
            kmeans_iterations=(kq.iterations, kk.iterations),
            warm_start=warm[0] and warm[1],
        )
    return out


def _gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The tokens ``indices`` (N, C) of ``x`` (N, S, D), as float32 centroids (N, C, D)."""
    return torch.gather(x.float(), 1, indices.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _host_kmeans(
    qf: torch.Tensor,
    kf: torch.Tensor,
    config: SVG2Config,
    state: SparseAttentionState,
    start: KMeansStart | None,
    share: tuple[int, int, int] | None,
) -> tuple[KMeansResult, KMeansResult, tuple[bool, bool]]:
    """k-means of the queries and the keys with host-decided starts: a given `KMeansStart`'s, or
    (without one) warm from the state's centroids of this shape and device, else cold from a
    draw made here (`_initial_centroids`). Returns both results and whether each started warm."""
    jobs = ((qf, config.num_q_clusters, state.q_centroids), (kf, config.num_k_clusters, state.k_centroids))
    if start is not None:
        warm = tuple(not c for c in start.cold)
        pairs = zip((qf, kf), warm, start.indices, start.centroids)
        inits = [stored if w else _gather(x, idx) for x, w, idx, stored in pairs]
    else:
        warm = tuple(
            s is not None and s.shape == (x.shape[0], c, x.shape[2]) and s.device == x.device for x, c, s in jobs
        )
        cold = [(x, c) for (x, c, _), w in zip(jobs, warm) if not w]
        drawn = iter(_initial_centroids(cold, config.seed + state.calls, share))
        inits = [s if w else next(drawn) for (_, _, s), w in zip(jobs, warm)]
    kq, kk = (
        kmeans(x, c, init=init, iterations=config.kmeans_iters if w else config.kmeans_init_iters,
               tol=config.kmeans_tol, backend=config.kmeans_backend)
        for (x, c, _), init, w in zip(jobs, inits, warm)
    )  # fmt: skip
    return kq, kk, warm


def _check_clustering(clustering: Clustering, rows: int, sq: int, sk: int, config: SVG2Config) -> None:
    """A given `Clustering` fits this call: rows = batch x heads, video queries / keys, clusters."""
    if not isinstance(clustering, Clustering):
        raise TypeError(f"clustering must be a Clustering, got {type(clustering).__name__}")
    cq, ck = config.num_q_clusters, config.num_k_clusters
    if config.layout == "tiles":
        cq, ck = num_tiles(sq, config.q_block_size), num_tiles(sk, config.kv_block_size)
    want = dict(q_labels=(rows, sq), q_counts=(rows, cq), k_labels=(rows, sk), k_counts=(rows, ck),
                selected=(rows, cq, ck))  # fmt: skip
    got = {name: tuple(getattr(clustering, name).shape) for name in want}
    if got != want:
        raise ValueError(f"clustering must have the shapes {want} of this call, got {got}")


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SVG2Config,
    clustering: Clustering,
    dense_prefix: int,
    prefix_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    prefix_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, str, torch.Tensor | None, torch.Tensor]:
    """Block-sparse attention of a clustering (`semantic_sparse_attention` after k-means): the
    output, backend, computed tile fraction (flex) and the density over all pairs, the dense
    prefix rows and columns included (a 0-dim tensor)."""
    b, h, sq, _ = q.shape
    sk, n = k.shape[2], dense_prefix
    c = clustering
    if n:  # the prefix is one more key cluster (label Ck), selected by every query cluster
        ck = c.k_counts.shape[1]
        prefix = c.k_labels.new_full((b * h, n), ck)
        counts = c.k_counts.new_full((b * h, 1), n)
        chosen = F.pad(c.selected, (0, 1), value=True)
        if prefix_mask is not None:  # masked prefix keys: one more cluster (Ck + 1) nobody selects
            valid = prefix_mask.to(torch.bool).repeat_interleave(h, 0)
            prefix = torch.where(valid, prefix, ck + 1)
            counts = torch.stack([valid.sum(1), (~valid).sum(1)], 1).to(counts.dtype)
            chosen = F.pad(chosen, (0, 1), value=False)
        k_labels = torch.cat([prefix, c.k_labels], 1)
        k_counts = torch.cat([c.k_counts, counts], 1)
        video, backend, block_density = _clustered_attention(
            q[:, :, n:], k, v, c.q_labels, k_labels, c.q_counts, k_counts, chosen, config
        )
        prefix = (prefix_attention or F.scaled_dot_product_attention)(q[:, :, :n], k, v)
        out = torch.cat([prefix, video], 2)
    else:
        out, backend, block_density = _clustered_attention(
            q, k, v, c.q_labels, c.k_labels, c.q_counts, c.k_counts, c.selected, config,
            one_group_per_tile=config.layout == "tiles",
        )  # fmt: skip
    sv, kv = sq - n, sk - n  # video queries, video keys (Sq != Sk without a prefix)
    video_pairs = _mask_density(c.selected, c.q_counts, c.k_counts) * (sv * kv)
    return out, backend, block_density, (video_pairs + (sq * sk - sv * kv)) / (sq * sk)


# ------------------------------------------------------------------------------------------
# Diffusers attention processors, statistics, apply_svg2
# ------------------------------------------------------------------------------------------

#: the video transformers SVG2 patches (from the model adapters' tables)
SUPPORTED_TRANSFORMERS = (*wan.TRANSFORMERS, *cogvideox.TRANSFORMERS, *hunyuan_video.TRANSFORMERS)

_BACKEND_NAMES = ("dense", "masked", "flex", "reference")


class SVG2Stats(Stats):
    """What SVG2 did, per attention call.

    ``summary()`` counts calls per backend ("dense" in warm-up) and averages the mask-weighted
    density; the counters are tensors on the attention's device, updated in place, so counting
    reads nothing back to the host and also works under ``torch.compile``. Only with
    ``SVG2Config(profile=True)`` do eager calls also append one dict to ``records`` (layer,
    timestep, backend, density, computed-tile fraction, k-means iterations, warm start, k-means
    and attention seconds) and add up ``kmeans_s`` / ``attention_s``: each such call reads its
    numbers back and synchronises the device.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.kmeans_s = 0.0
        self.attention_s = 0.0
        self._calls = torch.zeros(len(_BACKEND_NAMES), dtype=torch.float64)
        self._density = torch.zeros(len(_BACKEND_NAMES), dtype=torch.float64)

    def reset(self) -> None:
        self.records.clear()
        self.kmeans_s = self.attention_s = 0.0
        self._calls.zero_()
        self._density.zero_()

    def _count(self, backend: str, density: torch.Tensor | float) -> None:
        if torch.compiler.is_exporting():  # an exported program is a pure function: it counts nothing
            return
        i = _BACKEND_NAMES.index(backend)
        if isinstance(density, torch.Tensor) and not torch.compiler.is_compiling():
            if density.device != self._density.device:  # once: the counters follow the model's device
                self._calls, self._density = self._calls.to(density.device), self._density.to(density.device)
        self._calls[i] += 1
        self._density[i] += density.to(self._density) if isinstance(density, torch.Tensor) else density

    def summary(self) -> dict[str, int | float | None]:
        """Calls (per backend), mean density over all calls (dense = 1) and over sparse calls
        (None when there were none), k-means and attention seconds of the eager sparse calls."""
        calls, density = self._calls.tolist(), self._density.tolist()
        n, sparse = sum(calls), sum(calls) - calls[0]
        out: dict[str, int | float | None] = {"calls": int(n), "sparse_calls": int(sparse)}
        out.update({f"{b}_calls": int(c) for b, c in zip(_BACKEND_NAMES, calls)})
        out["density"] = sum(density) / n if n else None
        out["sparse_density"] = (sum(density) - density[0]) / sparse if sparse else None
        out["kmeans_s"] = float(self.kmeans_s)
        out["attention_s"] = float(self.attention_s)
        return out


class _Clock:
    """The denoising step of the transformer forward being computed, read once per forward.

    The timestep comes from ``current_timestep_callback`` or the forward's ``timestep``
    argument (validated by `read_timestep`); the step index from its position in
    ``scheduler.timesteps``. A timestep above the previous one starts a new generation: every
    layer's k-means memory is dropped so its first sparse call cold-starts.

    It also makes every sparse layer's `KMeansStart` for this forward (the random draw of a cold
    start from a host CPU generator, `_draw_indices`, from the latents' token grid; the stored
    centroids of a warm one): the attention processors then only gather, and a cold and a warm
    step are one compiled program.

    Under ``torch.export`` the exported program is a pure function: every call of it cold-starts
    k-means from the seed's draw (as the first forward after `apply_svg2`), keeps no k-means
    memory and counts no stats; the timestep is not read (nothing depends on it) and the model's
    state is left as it was. With ``dense_steps > 0`` the dense-or-sparse choice depends on the
    timestep's value, which an exported program cannot decide on the host: ``NotImplementedError``.
    """

    def __init__(
        self,
        config: SVG2Config,
        callback: Callable[[], Any] | None,
        scheduler: Any,
        signature: inspect.Signature,
        handle: SVG2Handle,
        token_grid: Callable[[torch.nn.Module, torch.Tensor], tuple[int, int, int]],
    ) -> None:
        self.config, self.callback, self.scheduler = config, callback, scheduler
        self.signature, self.handle, self.token_grid = signature, handle, token_grid
        cfg = getattr(scheduler, "config", None)
        self.num_train_timesteps = int(getattr(cfg, "num_train_timesteps", None) or 1000)
        self.timestep: float | None = None
        self.dense_step = False

    @torch.compiler.disable  # host-side decision, before the forward's first tensor op
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:  # forward pre-hook
        bound = self.signature.bind(*args, **kwargs)
        if torch.compiler.is_exporting():
            if self.config.dense_steps > 0:
                raise NotImplementedError(
                    "torch.export of a model whose technique decides from the timestep's value is not implemented: "
                    f"SVG2's dense warm-up (dense_steps={self.config.dense_steps}) picks dense or sparse steps on the "
                    "host each forward. Export with dense_steps=0 (each call then cold-starts k-means) or compile "
                    "with torch.compile"
                )
            self._prepare_starts(module, bound.arguments.get("hidden_states"), fresh=True)
            return
        n = self.num_train_timesteps
        if self.callback is not None:
            t = read_timestep(self.callback(), n)
        else:
            t = read_timestep(bound.arguments.get("timestep"), n, source="the transformer's timestep argument")
        if self.timestep is not None and t > self.timestep:
            self.handle.reset_state()
        self.timestep = t
        self.dense_step = False
        if self.config.dense_steps > 0:
            timesteps = self.scheduler.timesteps
            if timesteps is None or len(timesteps) == 0:
                raise ValueError("scheduler has no timesteps yet: call scheduler.set_timesteps(num_steps) first")
            index, count = step_position(t, timesteps)
            self.dense_step = index < dense_step_count(self.config.dense_steps, count)
        self._prepare_starts(module, bound.arguments.get("hidden_states"), fresh=False)

    def _prepare_starts(self, module: torch.nn.Module, latents: Any, fresh: bool) -> None:
        """Every sparse layer's `KMeansStart` for a forward of ``latents`` (B, C, F, H, W);
        ``fresh``: as after a reset, the state left as it is (export: made outside the trace's
        modes, so the draw is a constant of the exported program)."""
        for proc in self.handle.processors:
            proc.state.start = None
        if not (isinstance(latents, torch.Tensor) and latents.ndim == 5) or self.dense_step:
            return
        tokens = math.prod(self.token_grid(module, latents))
        with _outside_the_trace() if fresh else contextlib.nullcontext():
            for proc in self.handle.processors:
                if not proc.dense_layer:
                    proc.state.start = proc._start(latents.shape[0], tokens, latents.device, fresh)


def _outside_the_trace() -> contextlib.AbstractContextManager:
    """Run real tensor ops while ``torch.export`` traces (its fake and proxy modes off): what is
    made there enters the exported program as constants."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _recomputing() -> bool:
    """Whether this eager call is a checkpointed block's recompute: torch's checkpoint recomputes
    inside the backward pass, the only time a graph task is running."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class _SVG2Processor:
    """Shared part: dense warm-up decision (by step and layer), k-means state and stats, the
    cold-start draw made ahead (`_cold_start_draw`) and the decision kept for a recompute.

    Gradient checkpointing: an eager forward call with gradients keeps its decision (``kept``:
    "dense" or its `Clustering`); a call inside the backward pass (`_recomputing`) is a
    checkpointed block's recompute and takes the kept decision: dense, or the kept clustering
    without k-means, and without touching the k-means memory or the stats, so it saves the
    tensors its forward saved. Only the layer's latest forward's decision is kept: a recompute
    after more than one forward with gradients since the layer's last recompute could be of an
    earlier one, and raises; so does the recompute of a reentrant checkpoint, whose forward runs
    without gradients (diffusers' checkpointing is non-reentrant)."""

    _attention_backend = None  # set by diffusers' set_attention_backend; used by the dense paths
    _parallel_config = None

    def __init__(
        self,
        layer_idx: int,
        num_layers: int,
        heads: int,
        head_dim: int,
        config: SVG2Config,
        clock: _Clock,
        stats: SVG2Stats,
    ) -> None:
        self.layer_idx = layer_idx
        self.heads, self.head_dim = heads, head_dim
        self.config = config
        self.clock = clock
        self.stats = stats
        self.state = SparseAttentionState()
        self.dense_layer = layer_idx < dense_layer_count(config.dense_layers, num_layers)
        self.kept: Clustering | str | None = None
        self.kept_forwards = 0  # forwards with gradients since this layer's last recompute
        # the start's host constants: (warm, cold) flags and Lloyd rounds, made once
        self._flags = (torch.tensor(False), torch.tensor(True))
        self._rounds = (torch.tensor(config.kmeans_iters), torch.tensor(config.kmeans_init_iters))
        self._draw: tuple[_DrawKey, list[torch.Tensor]] | None = None  # the latest draw, on its device
        self._idle: tuple[torch.Tensor, torch.Tensor] | None = None  # indices a warm job carries

    def _start(self, batch: int, tokens: int, device: torch.device, fresh: bool) -> KMeansStart | None:
        """The `KMeansStart` of this layer's next sparse call for ``batch`` samples of ``tokens``
        video tokens on ``device``: a job warm-starts from the state's centroids of its shape on
        this device, else cold from the draw of seed ``seed + calls`` (`_draw_indices`; the same
        test and draw as `semantic_sparse_attention` without a start). ``fresh``: every job cold,
        seed ``seed`` (as after a reset). None when the call will raise its own error."""
        state, config = self.state, self.config
        ulysses = _ulysses(self._parallel_config)
        local = self.heads if ulysses is None else self.heads // ulysses[1]
        rows, counts = batch * local, (config.num_q_clusters, config.num_k_clusters)
        if counts[0] > tokens or counts[1] > tokens:
            return None
        stored = (None, None) if fresh else (state.q_centroids, state.k_centroids)
        cold = tuple(
            s is None or s.shape != (rows, c, self.head_dim) or s.device != device for s, c in zip(stored, counts)
        )
        idle = self._idle_indices(rows, device)
        if not any(cold):  # the steady state: nothing to draw or allocate
            return KMeansStart(tokens, rows, cold, self._flags[:1] * 2, self._rounds[:1] * 2, idle, stored)
        share = None if ulysses is None else (ulysses[0] * local, local, self.heads)
        jobs = [(rows, tokens, c) for c, is_cold in zip(counts, cold) if is_cold]
        drawn = iter(self._drawn(_draw_key(jobs, config.seed + (0 if fresh else state.calls), share), device))
        return KMeansStart(
            tokens, rows, cold,
            tuple(self._flags[is_cold] for is_cold in cold),
            tuple(self._rounds[is_cold] for is_cold in cold),
            tuple(next(drawn) if is_cold else i for i, is_cold in zip(idle, cold)),
            tuple(torch.zeros(rows, c, self.head_dim, device=device) if is_cold else x
                  for x, c, is_cold in zip(stored, counts, cold)),
        )  # fmt: skip

    def _drawn(self, key: _DrawKey, device: torch.device) -> list[torch.Tensor]:
        """The draw of ``key`` on ``device`` (the latest one is kept: a repeated cold start draws once)."""
        if self._draw is None or self._draw[0] != key or self._draw[1][0].device != device:
            self._draw = key, [idx.to(device).contiguous() for idx in _draw_indices(key)]
        return self._draw[1]

    def _idle_indices(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid token indices (zeros) the query and key jobs carry when warm, in place of a
        draw (the same shapes as a draw's, so a compiled call sees one input), made once."""
        if self._idle is None or self._idle[0].shape[0] != rows or self._idle[0].device != device:
            self._idle = tuple(
                torch.zeros(rows, c, dtype=torch.long, device=device)
                for c in (self.config.num_q_clusters, self.config.num_k_clusters)
            )
        return self._idle

    def _plan(self, attention_mask: torch.Tensor | None) -> tuple[bool, Clustering | None]:
        """(dense, clustering) of this call. A forward decides (dense warm-up by step and layer;
        clustering None: k-means runs) and counts a dense call; a recompute takes its forward's."""
        if attention_mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not implement attention masks")
        if _recomputing():
            kept = self._kept_for_recompute()
            return (True, None) if isinstance(kept, str) else (False, kept)
        dense = self.dense_layer or self.clock.dense_step
        if dense:
            self._keep("dense")
            self.stats._count("dense", 1.0)
            if self.config.profile and not torch.compiler.is_compiling():
                self.stats.records.append(
                    dict(layer=self.layer_idx, timestep=self.clock.timestep, backend="dense", density=1.0,
                         block_density=None, kmeans_s=0.0, attention_s=0.0, kmeans_iterations=(0, 0),
                         warm_start=False)
                )  # fmt: skip
        return dense, None

    def _keep(self, decision: Clustering | str) -> None:
        """An eager forward with gradients keeps its decision for a checkpointed recompute."""
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.kept = decision
            self.kept_forwards += 1

    def _kept_for_recompute(self) -> Clustering | str:
        if self.kept is None:
            raise RuntimeError(
                f"SVG2 layer {self.layer_idx} is recomputed in a backward pass, but no forward of it ran with "
                "gradients: there is no decision to recompute with (a reentrant checkpoint, use_reentrant=True, "
                "runs its forward without gradients; diffusers' own checkpointing is non-reentrant)"
            )
        if self.kept_forwards > 1:
            raise RuntimeError(
                f"SVG2 layer {self.layer_idx} is recomputed in a backward pass after {self.kept_forwards} forwards "
                "with gradients, and keeps only the latest one's clustering for its recompute, which may be of "
                "an earlier one: run each checkpointed forward's backward before the next forward with "
                "gradients (forwards without a backward under torch.no_grad())"
            )
        self.kept_forwards = 0
        return self.kept

    def _done(self, clustering: Clustering | None) -> None:
        """After a sparse call: a forward's stats and kept clustering (a recompute changes neither)."""
        if clustering is None:
            self._record()
            self._keep(self.state.clustering())

    def _record(self) -> None:
        state = self.state
        self.stats._count(state.backend, state.density)
        if self.config.profile and not torch.compiler.is_compiling():
            self.stats.records.append(dict(layer=self.layer_idx, timestep=self.clock.timestep, **state.last.as_record()))
            self.stats.kmeans_s += state.last.kmeans_s
            self.stats.attention_s += state.last.attention_s


def _ulysses(parallel_config: Any) -> tuple[int, int] | None:
    """(this rank's index, degree) of diffusers' Ulysses context parallelism, None without it.
    Ring attention needs the partial softmax statistics (LSE) of every block, which the
    cluster-sparse kernels do not return: refused."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or (cp.ring_degree or 1) * (cp.ulysses_degree or 1) <= 1:
        return None
    if (cp.ring_degree or 1) > 1:
        raise NotImplementedError(
            "SVG2 under ring context parallelism is not implemented (the sparse kernels return no "
            "log-sum-exp to merge ring blocks); use ContextParallelConfig(ulysses_degree=N)"
        )
    return cp._ulysses_mesh.get_local_rank(), cp.ulysses_degree


class SVG2WanAttnProcessor(_SVG2Processor):
    """Processor for a Wan self-attention (``attn1``): SVG2 sparse attention, or dense attention
    through diffusers' dispatch during warm-up (by step and by layer)."""

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
        query, key, value = wan.project_qkv(attn, hidden_states, rotary=rotary_emb)
        dense, clustering = self._plan(attention_mask)
        if dense:  # dispatch: backend and context parallelism apply
            return wan.project_out(attn, wan.attention(attn, query, key, value), query)
        ulysses = _ulysses(self._parallel_config)
        if ulysses is None:
            out = semantic_sparse_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.config, self.state,
                clustering=clustering,
            ).transpose(1, 2)  # fmt: skip
        else:  # diffusers' Ulysses all-to-all around our sparse op: full sequence, a share of heads
            rank, degree = ulysses
            total = query.shape[2]

            def sparse_op(ctx, q, k, v, *args: Any, **kwargs: Any) -> torch.Tensor:
                h = q.shape[2]
                return semantic_sparse_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.config, self.state,
                    heads=(rank * h, total), clustering=clustering,
                ).transpose(1, 2)  # fmt: skip

            from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

            out = TemplatedUlyssesAttention.apply(
                query, key, value, None, 0.0, False, None, False, False, sparse_op, None, self._parallel_config
            )
        self._done(clustering)
        return wan.project_out(attn, out, query)


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
        if _ulysses(self._parallel_config) is not None:
            raise NotImplementedError("SVG2 on CogVideoX under context parallelism is not implemented")
        text_len = encoder_hidden_states.shape[1]
        query, key, value = cogvideox.project_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        dense, clustering = self._plan(attention_mask)
        if dense:
            return cogvideox.project_out(attn, cogvideox.attention(attn, query, key, value), text_len)

        def text_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return cogvideox.attention(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        out = semantic_sparse_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.config, self.state,
            dense_prefix=text_len, prefix_attention=text_rows, clustering=clustering,
        )  # fmt: skip
        self._done(clustering)
        return cogvideox.project_out(attn, out.transpose(1, 2), text_len)


class SVG2HunyuanVideoAttnProcessor(_SVG2Processor):
    """Processor for HunyuanVideo's joint video+text attention (dual- and single-stream blocks'
    ``attn``): the text tokens (last in HunyuanVideo's sequence) attend and are attended densely,
    padded text keys stay masked as the model's key mask says, video-video attention is
    SVG2-sparse; dense warm-up as for Wan."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _ulysses(self._parallel_config) is not None:
            raise NotImplementedError("SVG2 on HunyuanVideo under context parallelism is not implemented")
        t = encoder_hidden_states.shape[1]
        query, key, value = hunyuan_video.project_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        dense, clustering = self._plan(None)  # the key mask is the model's own, not a user mask
        if dense:
            return hunyuan_video.project_out(attn, hunyuan_video.attention(attn, query, key, value, attention_mask), t)

        def text_first(x: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([x.narrow(dim, x.shape[dim] - t, t), x.narrow(dim, 0, x.shape[dim] - t)], dim)

        mask = None if attention_mask is None else text_first(attention_mask, -1)

        def text_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = hunyuan_video.attention(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
            return out.transpose(1, 2)

        out = semantic_sparse_attention(
            *(text_first(x, 1).transpose(1, 2) for x in (query, key, value)), self.config, self.state,
            dense_prefix=t, prefix_attention=text_rows,
            prefix_mask=None if mask is None else mask.flatten(0, 2)[:, :t], clustering=clustering,
        )  # fmt: skip
        self._done(clustering)
        out = out.transpose(1, 2)
        return hunyuan_video.project_out(attn, torch.cat([out[:, t:], out[:, :t]], 1), t)


class SVG2Handle(PatchHandle):
    """What `apply_svg2` returns: the undo log, ``stats`` (`SVG2Stats`) and the per-layer
    ``processors``."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.stats = SVG2Stats()
        self.processors: list[_SVG2Processor] = []

    def reset_state(self) -> None:
        """Drop every layer's k-means centroids (the next sparse call cold-starts)."""
        for proc in self.processors:
            proc.state.reset()


_DIFFUSERS_SETTINGS = ("_attention_backend", "_parallel_config")


def _hand_back_settings(ours: list[_SVG2Processor], originals: list[Any]) -> None:
    """On removal: a backend or context-parallel config that diffusers' ``set_attention_backend``
    / ``enable_parallelism`` set while our processors were in place goes to the processors that
    come back, as if they had been there all along."""
    for proc, old in zip(ours, originals):
        for attr in _DIFFUSERS_SETTINGS:
            if hasattr(old, attr) and getattr(proc, attr) is not getattr(old, attr, None):
                setattr(old, attr, getattr(proc, attr))


def apply_svg2(
    transformer: torch.nn.Module,
    config: SVG2Config | None = None,
    current_timestep_callback: Callable[[], Any] | None = None,
    *,
    scheduler: Any = None,
) -> SVG2Handle:
    """Install SVG2 sparse self-attention on a diffusers video transformer.

    ``config=None`` means ``SVG2Config()`` (the reference Wan settings).
    ``current_timestep_callback`` returns the scheduler's timestep (``lambda:
    pipe.current_timestep``); without it the transformer's own ``timestep`` argument is read.
    ``scheduler`` (e.g. ``pipe.scheduler``) supplies the timesteps that the step-counted dense
    warm-up counts in: the first ``floor(config.dense_steps * len(scheduler.timesteps))`` steps
    run dense; it is required when ``config.dense_steps > 0``. A timestep that is not valid or
    not one of the scheduler's raises ``ValueError`` at that forward. Supported:
    ``WanTransformer3DModel`` and ``CogVideoXTransformer3DModel`` (others raise ``TypeError``), or
    a pipeline: every transformer it holds (Wan 2.2: both experts; scheduler and timestep from the
    pipeline; `mmaccel.runtime.pipelines`). ``handle.remove()`` restores the original processors; ``handle.stats`` records every call.
    """
    from mmaccel.runtime.adapters import require_family
    from mmaccel.runtime.pipelines import apply_to_pipeline, is_pipeline, timestep_callback

    if is_pipeline(transformer):  # every transformer of the pipeline (Wan 2.2: both experts), one handle
        scheduler = transformer.scheduler if scheduler is None else scheduler
        return apply_to_pipeline(transformer, apply_svg2, SVG2Handle, "svg2", config, scheduler=scheduler,
                                 current_timestep_callback=timestep_callback(transformer, current_timestep_callback))
    family = require_family(transformer, SUPPORTED_TRANSFORMERS, "apply_svg2")
    config = resolve_config(config, SVG2Config)
    check_timestep_callback(current_timestep_callback)
    if config.dense_steps > 0 and scheduler is None:
        raise ValueError(
            f"config.dense_steps={config.dense_steps} counts denoising steps and needs scheduler= "
            "(the pipeline's scheduler, e.g. scheduler=pipe.scheduler); set dense_steps=0 to run "
            "sparse from the first step"
        )
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise TypeError(f"scheduler must be a diffusers scheduler with .timesteps, got {type(scheduler).__name__}")
    adapter = {"wan": wan, "cogvideox": cogvideox, "hunyuan_video": hunyuan_video}[family]
    if family == "wan":
        wan.check_self_attention(transformer, "SVG2")
    blocks = adapter.blocks(transformer)
    cls = {"wan": SVG2WanAttnProcessor, "cogvideox": SVG2CogVideoXAttnProcessor,
           "hunyuan_video": SVG2HunyuanVideoAttnProcessor}[family]  # fmt: skip
    attention = "attn" if family == "hunyuan_video" else "attn1"  # the joint/self-attention of a block
    handle = SVG2Handle(transformer, "svg2")
    clock = _Clock(config, current_timestep_callback, scheduler, inspect.signature(transformer.forward), handle,
                   adapter.token_grid)  # fmt: skip
    try:
        handle.add_torch_hook(transformer.register_forward_pre_hook(clock, with_kwargs=True))
        if family == "cogvideox":  # its own fuse_qkv_projections() would replace our processors
            cogvideox.keep_processors_on_fusion(handle, transformer)
        originals = [getattr(block, attention).processor for block in blocks]
        for i, block in enumerate(blocks):
            attn = getattr(block, attention)
            proc = cls(i, len(blocks), attn.heads, attn.inner_dim // attn.heads, config, clock, handle.stats)
            # what set_attention_backend / enable_parallelism put on the processor we replace
            for attr in ("_attention_backend", "_parallel_config"):
                if getattr(getattr(block, attention).processor, attr, None) is not None:
                    setattr(proc, attr, getattr(getattr(block, attention).processor, attr))
            handle.processors.append(proc)
            handle.set_processor(getattr(block, attention), proc)
        handle.on_remove(lambda: _hand_back_settings(handle.processors, originals))
    except BaseException:
        handle.remove()
        raise
    return handle
