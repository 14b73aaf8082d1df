"""The padding-free ``"tiles"`` layout of SVG2: hardware tiles as the selection units.

Sparse VideoGen2 (Yang et al., 2025, arXiv:2505.18875) selects (query cluster, key cluster)
pairs and attends block-sparsely over the clusters made contiguous. Here (our variant, issue 27)
the tokens of each row are sorted by their k-means cluster, as the paper permutes them, and cut
into consecutive groups of ``block`` tokens (the kernel's tile: 128 queries, ``kv_block_size``
keys; the last group of a row holds the ``S mod block`` remaining tokens). The key *tiles*
replace the key clusters as the units of the selection: a key tile's centroid is the mean of
its tokens, and SVG2's rule (`select_clusters`: size-weighted softmax of ``C_q C_k^T /
sqrt(d)``, top-p plus the top ``min_kc_ratio`` share, here of the key tiles) picks key tiles per
query *cluster*. A query tile holds the tokens of one or more (consecutive) query clusters and
takes the union of their selections (`query_tile_union`): each query attends to exactly the
tokens of the key tiles selected by a query cluster of its tile, a superset of its own
cluster's. (Query tiles as selection units, their centroid the mean of their tokens, were
measured first: a tile mixing two clusters gets a selection that fits neither, 1.5-3.5x the
error at equal density, `docs/sparse_attn.md`.)

A tile holds one group, so in the unpadded flex kernel every computed tile is full (no element
mask) and the computed tile fraction equals the mask-weighted density; only the last, short
tile of a side whose length is not a multiple of ``block`` takes a mask, which drops its empty
slots (the length bound). Everything runs on the device with static shapes: one per-row stable
sort, one scatter, one ``index_add_``; no host read, no data-dependent loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TileGroups", "num_tiles", "query_tile_union", "tile_groups"]


def num_tiles(tokens: int, block: int) -> int:
    """Tiles of ``block`` tokens covering ``tokens`` (the last one short when not divisible)."""
    for name, value in (("tokens", tokens), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return -(-tokens // block)


@dataclass(frozen=True, eq=False)
class TileGroups:
    """One side's tiles: ``labels`` (N, S) long, the tile of every token (in its original
    order); ``counts`` (N, T) long, tokens per tile (``block``, the last ``S - (T - 1) block``);
    ``centroids`` (N, T, D) float32, the mean of each tile's tokens (None when not asked for);
    ``first`` / ``last`` (N, T) long, the clusters of a tile's first and last token (its tokens'
    clusters are the non-empty ones from ``first`` to ``last``: the tokens are in cluster order)."""

    labels: torch.Tensor
    counts: torch.Tensor
    centroids: torch.Tensor | None
    first: torch.Tensor
    last: torch.Tensor


def tile_groups(
    x: torch.Tensor, cluster_labels: torch.Tensor, block: int, centroids: bool = True
) -> TileGroups:
    """Tiles of ``x`` (N, S, D) sorted by ``cluster_labels`` (N, S): the tokens of a row in
    cluster order (stable: ties keep their token order) cut into consecutive groups of ``block``;
    ``centroids=False`` skips the tile means (the query side, selected by its clusters)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(
            f"x must be a (rows, tokens, dim) tensor, got {getattr(x, 'shape', type(x).__name__)}"
        )
    if not isinstance(cluster_labels, torch.Tensor) or cluster_labels.shape != x.shape[:2]:
        raise ValueError(
            f"cluster_labels must be a {tuple(x.shape[:2])} tensor, got {getattr(cluster_labels, 'shape', None)}"
        )
    n, s, d = x.shape
    t = num_tiles(s, block)
    dev = x.device
    sorted_labels, order = cluster_labels.sort(dim=-1, stable=True)  # per row: token at each sorted position
    slot_tile = (torch.arange(s, device=dev) // block).expand(n, s)
    labels = torch.empty_like(order).scatter_(1, order, slot_tile)
    counts = (s - torch.arange(t, device=dev) * block).clamp(max=block).expand(n, t).contiguous()
    means = None
    if centroids:
        rows = (labels + torch.arange(n, device=dev).unsqueeze(1) * t).view(-1)  # one flat row per tile
        sums = torch.zeros(n * t, d, device=dev).index_add_(0, rows, x.reshape(n * s, d).float())
        means = sums.view(n, t, d) / counts.unsqueeze(-1)
    ends = ((torch.arange(t, device=dev) + 1) * block).clamp(max=s) - 1  # each tile's last slot
    first, last = sorted_labels[:, ::block], sorted_labels.index_select(1, ends)
    return TileGroups(labels, counts, means, first, last)


def query_tile_union(selected: torch.Tensor, tiles: TileGroups, cluster_counts: torch.Tensor) -> torch.Tensor:
    """(N, query tiles, key tiles) bool: per query tile, the union of the rows of ``selected``
    (N, Cq, key tiles) of the non-empty query clusters (``cluster_counts`` (N, Cq)) its tokens
    belong to. A prefix sum over the clusters: two gathers per tile, no loop."""
    n, _, tk = selected.shape
    kept = (selected & (cluster_counts > 0).unsqueeze(-1)).to(torch.int32)
    prefix = F.pad(kept.cumsum(1), (0, 0, 1, 0))  # (N, Cq + 1, Tk): selections of the clusters below

    def at(clusters: torch.Tensor) -> torch.Tensor:
        return prefix.gather(1, clusters.unsqueeze(-1).expand(n, -1, tk))

    return at(tiles.last + 1) - at(tiles.first) > 0
