"""The padding-free ``"tiles"`` layout of SVG2: hardware tiles as the selection units.

Sparse VideoGen2 (Yang et al., 2025, arXiv:2505.18875) selects (query cluster, key cluster)
pairs and attends block-sparsely over the clusters made contiguous. Here (our variant, issue 27)
the tokens of each row are sorted by their k-means cluster, as the paper permutes them, and cut
into consecutive groups of ``block`` tokens (the kernel's tile: 128 queries, ``kv_block_size``
keys; the last group of a row holds the ``S mod block`` remaining tokens). These *tiles* replace
the clusters as the units of the selection: a tile's centroid is the mean of its tokens, and
SVG2's rule (`select_clusters`: size-weighted softmax of ``C_q C_k^T / sqrt(d)``, top-p plus
the top ``min_kc_ratio`` share, here of the key tiles) picks key tiles per query tile. Each
query then attends to exactly the tokens of its selected key tiles.

A tile holds one group, so in the unpadded flex kernel every computed tile is full (no element
mask) and the computed tile fraction equals the mask-weighted density; only the last, short
tile of a side whose length is not a multiple of ``block`` takes a mask, which drops its empty
slots (the length bound). Everything runs on the device with static shapes: one per-row stable
sort, one scatter, one ``index_add_``; no host read, no data-dependent loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TileGroups", "num_tiles", "tile_groups"]


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
    ``centroids`` (N, T, D) float32, the mean of each tile's tokens."""

    labels: torch.Tensor
    counts: torch.Tensor
    centroids: torch.Tensor


def tile_groups(x: torch.Tensor, cluster_labels: torch.Tensor, block: int) -> TileGroups:
    """Tiles of ``x`` (N, S, D) sorted by ``cluster_labels`` (N, S): the tokens of a row in
    cluster order (stable: ties keep their token order) cut into consecutive groups of ``block``."""
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
    order = cluster_labels.sort(dim=-1, stable=True)[1]  # per row: token at each sorted position
    slot_tile = (torch.arange(s, device=dev) // block).expand(n, s)
    labels = torch.empty_like(order).scatter_(1, order, slot_tile)
    counts = (s - torch.arange(t, device=dev) * block).clamp(max=block).expand(n, t).contiguous()
    rows = (labels + torch.arange(n, device=dev).unsqueeze(1) * t).view(-1)  # one flat row per tile
    sums = torch.zeros(n * t, d, device=dev).index_add_(0, rows, x.reshape(n * s, d).float())
    return TileGroups(labels, counts, sums.view(n, t, d) / counts.unsqueeze(-1))
