"""Semantic-aware sparse attention: k-means permutation + top-p cluster budget.

Sparse VideoGen2 (Yang et al., 2025, arXiv:2505.18875): per (batch, head), cluster Q and K with
k-means, score cluster pairs by ``C_q C_k^T / sqrt(d)`` with a size-weighted softmax, keep per
query cluster the smallest set of key clusters whose mass reaches ``top_p`` (plus the top
``min_kc_ratio`` of clusters), permute tokens so clusters are contiguous, run block-sparse
attention over the selected cluster pairs and undo the permutation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmaccel.runtime.budget import top_p_mask
from mmaccel.sparse_attn.backends import (
    BACKENDS,
    ClusterLayout,
    flex_attention_available,
    flex_block_sparse,
    masked_block_sparse,
    reference_block_sparse,
)
from mmaccel.sparse_attn.kmeans import kmeans

__all__ = [
    "AttentionInfo",
    "SVG2Config",
    "cluster_means",
    "cluster_sparse_attention",
    "SparseAttentionState",
    "mask_density",
    "select_clusters",
    "semantic_sparse_attention",
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


@dataclass(frozen=True)
class SVG2Config:
    """Knobs of semantic sparse attention (defaults: the reference Wan 2.1 settings).

    num_q_clusters / num_k_clusters: k-means clusters for queries / keys (reference at 720p,
        ~76K tokens: 300 / 1000; scale with the sequence length; at most the token count).
    top_p: attention mass each query cluster keeps, in (0, 1].
    min_kc_ratio: fraction of key clusters always kept per query cluster (the top ones), [0, 1].
    kmeans_init_iters / kmeans_iters: iterations of a cold start / of a warm start.
    kmeans_tol: early stop once no centroid moves more than this.
    dense_steps / dense_layers: fraction of the first denoising steps / first layers run dense
        (used by `apply_sparse_attention`), each in [0, 1].
    backend: "auto" (flex for >= ``flex_min_tokens`` queries when available, else masked),
        "flex", "masked" (token-mask SDPA, small sizes) or "reference" (per-cluster gather).
    block_size: flex BlockMask block size (tokens).
    seed: seed of the random k-means initialisation.
    """

    num_q_clusters: int = 300
    num_k_clusters: int = 1000
    top_p: float = 0.9
    min_kc_ratio: float = 0.10
    kmeans_init_iters: int = 50
    kmeans_iters: int = 2
    kmeans_tol: float = 1e-4
    dense_steps: float = 0.2
    dense_layers: float = 0.03
    backend: str = "auto"
    block_size: int = 32
    flex_min_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        _int("num_q_clusters", self.num_q_clusters, 1)
        _int("num_k_clusters", self.num_k_clusters, 1)
        _fraction("top_p", self.top_p, "(0, 1]")
        _fraction("min_kc_ratio", self.min_kc_ratio, "[0, 1]")
        _int("kmeans_init_iters", self.kmeans_init_iters, 1)
        _int("kmeans_iters", self.kmeans_iters, 1)
        if isinstance(self.kmeans_tol, bool) or not isinstance(self.kmeans_tol, (int, float)):
            raise TypeError(f"kmeans_tol must be a float >= 0, got {type(self.kmeans_tol).__name__}")
        if not self.kmeans_tol >= 0:
            raise ValueError(f"kmeans_tol must be a float >= 0, got {self.kmeans_tol!r}")
        _fraction("dense_steps", self.dense_steps, "[0, 1]")
        _fraction("dense_layers", self.dense_layers, "[0, 1]")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _int("block_size", self.block_size, 16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        _int("flex_min_tokens", self.flex_min_tokens, 1)
        _int("seed", self.seed, 0)


@dataclass(frozen=True)
class AttentionInfo:
    """What one sparse attention call did: backend that ran, mask-weighted density
    (``sum(mask * |Q_i| |K_j|) / (Sq Sk)``), computed-block density (flex only), timings."""

    backend: str
    density: float
    block_density: float | None
    kmeans_s: float
    attention_s: float
    kmeans_iterations: tuple[int, int]
    warm_start: bool


@dataclass
class SparseAttentionState:
    """Per-layer k-means memory: the last Q / K centroids (B*H, C, D), reused as warm start.

    Consecutive calls on the same layer (later denoising steps, the CFG passes of one step)
    share it. ``last`` is the `AttentionInfo` of the latest call; ``q_labels`` / ``k_labels``
    (B*H, S) and ``selected`` (B*H, Cq, Ck) are its clustering and selection.
    """

    q_centroids: torch.Tensor | None = None
    k_centroids: torch.Tensor | None = None
    q_labels: torch.Tensor | None = None
    k_labels: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    last: AttentionInfo | None = None
    calls: int = field(default=0)

    def reset(self) -> None:
        """Forget everything (the next call cold-starts), e.g. before a new video."""
        self.q_centroids = self.k_centroids = self.last = None
        self.q_labels = self.k_labels = self.selected = None
        self.calls = 0


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
    the top ``ceil(min_kc_ratio * Ck)`` clusters (at least one). Empty key clusters carry no mass.
    """
    scores = q_centroids @ k_centroids.transpose(-1, -2) / math.sqrt(q_centroids.shape[-1])
    logits = scores + k_counts.float().log().unsqueeze(-2)  # log |K_j|; empty clusters -> -inf
    min_keep = max(1, math.ceil(min_kc_ratio * k_centroids.shape[-2]))
    return top_p_mask(logits, top_p, min_keep=min_keep)


def mask_density(selected: torch.Tensor, q_counts: torch.Tensor, k_counts: torch.Tensor) -> float:
    """Mask-weighted density ``sum(mask_ij |Q_i| |K_j|) / sum(|Q_i| |K_j|)``, averaged over rows."""
    qc, kc = q_counts.double(), k_counts.double()
    kept = torch.einsum("nij,ni,nj->n", selected.double(), qc, kc)
    return (kept / (qc.sum(-1) * kc.sum(-1))).mean().item()


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
) -> tuple[torch.Tensor, str, float | None]:
    """Run the chosen block-sparse backend over the selected cluster pairs."""
    b, h = q.shape[:2]
    layout = ClusterLayout(
        q_labels.view(b, h, -1), k_labels.view(b, h, -1), q_counts.view(b, h, -1), k_counts.view(b, h, -1)
    )
    sel = selected.view(b, h, *selected.shape[1:])
    backend = _choose_backend(config, q.shape[2])
    if backend == "flex":
        out, block_density = flex_block_sparse(q, k, v, layout, sel, config.block_size)
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
    k-means, e.g. for a positional (contiguous-block) baseline. Returns output and info."""
    _check_inputs(q, k, v, config)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if q_labels.shape != (b, h, sq) or k_labels.shape != (b, h, sk):
        raise ValueError(f"labels must be {(b, h, sq)} and {(b, h, sk)}, got {tuple(q_labels.shape)}, "
                         f"{tuple(k_labels.shape)}")  # fmt: skip
    ql, kl = q_labels.reshape(b * h, sq), k_labels.reshape(b * h, sk)
    cq, nq = cluster_means(q.reshape(b * h, sq, d), ql, config.num_q_clusters)
    ck, nk = cluster_means(k.reshape(b * h, sk, d), kl, config.num_k_clusters)
    selected = select_clusters(cq, ck, nk, config.top_p, config.min_kc_ratio)
    _sync(q.device)
    t0 = time.perf_counter()
    out, backend, block_density = _clustered_attention(q, k, v, ql, kl, nq, nk, selected, config)
    _sync(q.device)
    info = AttentionInfo(backend, mask_density(selected, nq, nk), block_density, 0.0,
                         time.perf_counter() - t0, (0, 0), False)  # fmt: skip
    return out, info


def semantic_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SVG2Config,
    state: SparseAttentionState | None = None,
    *,
    dense_prefix: int = 0,
) -> torch.Tensor:
    """SVG2 attention for ``q`` (B, H, Sq, D), ``k`` (B, H, Sk, D), ``v`` (B, H, Sk, Dv).

    Same layout and result type as ``F.scaled_dot_product_attention`` (scale ``1/sqrt(D)``,
    no mask). ``state`` carries the k-means centroids between calls (warm start) and receives
    an `AttentionInfo` in ``state.last``. With ``top_p=1`` and ``min_kc_ratio=1`` every pair is
    kept and the output equals dense attention up to float rounding.

    ``dense_prefix``: in joint attention (text tokens first, then video, Sq == Sk), the first
    ``dense_prefix`` tokens attend to everything and every query attends to them; only the
    video-video part is clustered and sparse.
    """
    _check_inputs(q, k, v, config, dense_prefix)
    state = SparseAttentionState() if state is None else state
    b, h, sq, d = q.shape
    sk, n = k.shape[2], dense_prefix
    qf, kf = q[:, :, n:].reshape(b * h, sq - n, d), k[:, :, n:].reshape(b * h, sk - n, d)

    _sync(q.device)
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed + state.calls)
    warm = {}
    results = []
    for name, x, c in (("q", qf, config.num_q_clusters), ("k", kf, config.num_k_clusters)):
        init = getattr(state, f"{name}_centroids")
        warm[name] = init is not None and init.shape == (b * h, c, d) and init.device == q.device
        results.append(
            kmeans(
                x,
                c,
                init=init if warm[name] else None,
                iterations=config.kmeans_iters if warm[name] else config.kmeans_init_iters,
                tol=config.kmeans_tol,
                generator=generator,
            )
        )
    kq, kk = results
    state.q_centroids, state.k_centroids = kq.centroids, kk.centroids
    selected = select_clusters(kq.centroids, kk.centroids, kk.counts, config.top_p, config.min_kc_ratio)
    _sync(q.device)
    t1 = time.perf_counter()

    if n:  # the prefix is one more key cluster (label Ck), selected by every query cluster
        k_labels = torch.cat([kk.labels.new_full((b * h, n), config.num_k_clusters), kk.labels], 1)
        k_counts = torch.cat([kk.counts, kk.counts.new_full((b * h, 1), n)], 1)
        video, backend, block_density = _clustered_attention(
            q[:, :, n:],
            k,
            v,
            kq.labels,
            k_labels,
            kq.counts,
            k_counts,
            F.pad(selected, (0, 1), value=True),
            config,
        )
        prefix = F.scaled_dot_product_attention(q[:, :, :n], k, v)
        out = torch.cat([prefix, video], 2)
    else:
        out, backend, block_density = _clustered_attention(
            q, k, v, kq.labels, kk.labels, kq.counts, kk.counts, selected, config
        )
    _sync(q.device)
    t2 = time.perf_counter()

    sv = sq - n
    video_pairs = mask_density(selected, kq.counts, kk.counts) * sv * sv
    state.calls += 1
    state.q_labels, state.k_labels, state.selected = kq.labels, kk.labels, selected
    state.last = AttentionInfo(
        backend=backend,
        density=(video_pairs + sq * sk - sv * sv) / (sq * sk),
        block_density=block_density,
        kmeans_s=t1 - t0,
        attention_s=t2 - t1,
        kmeans_iterations=(kq.iterations, kk.iterations),
        warm_start=warm["q"] and warm["k"],
    )
    return out
