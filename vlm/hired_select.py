"""HiRED's token selection for a whole batch, on the model's device, without host reads.

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models" (AAAI 2025). :func:`mmaccel.vlm.hired.select_visual_tokens`
states the rule for one image; this module computes the same keep masks for every image of a
batch at once, in three steps:

- **Host** (:class:`BatchLayout`, cached per image size by the caller): each image's packed
  LLM layout (partition of every position, newlines), its partition sizes and its budget. These
  depend on the image sizes only, so nothing here reads a tensor the device computed.
- **Budget on the device** (:func:`allocate_rows`): the crops' share of the budget follows the
  base image's top early-layer tokens counted per crop region, split exactly as
  :func:`mmaccel.runtime.budget.allocate` does (largest remainder, capacities), for all images
  at once: a fixed number of masked rounds instead of a data-dependent loop. float64 here
  only (the ranking's ``topk`` and the split), as the per-image code, so ties break the same.
- **Selection on the device**: per partition the top-``k`` tokens by the select-layer score
  (:func:`top_in_partition`: two stable sorts, ties to the lower position, as the per-image
  rule) or, with ``selection="diverse"``, DivPrune's greedy max-min diversity of the projected
  features (:func:`diverse_in_partition`; Alvar et al., "DivPrune: Diversity-based Visual Token
  Pruning for Large Multimodal Models", CVPR 2025); then the row newlines (:func:`with_newlines`).

Every step has static shapes given the layout, so ``count_hot_path`` sees no sync in it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmaccel.runtime.budget import TokenBudget

__all__ = [
    "NEWLINE",
    "PAD",
    "BatchLayout",
    "ImageLayout",
    "allocate_rows",
    "crop_mass",
    "crop_regions_of",
    "diverse_in_partition",
    "select_batch",
    "top_in_partition",
    "with_newlines",
]

NEWLINE = -1  # partition id of LLaVA-NeXT's image_newline positions
PAD = -2  # partition id of the padding that makes a batch's layouts one (B, L) tensor


@dataclass(frozen=True)
class ImageLayout:
    """One image as the LLM sees it, from its size alone (host values, built once per size).

    ``partition`` (L,): 0 = base image, 1..P-1 = crops, ``NEWLINE``; ``source`` (L,): index of each
    position in the image's flattened (partitions x N) tower tokens (0 for newlines); ``region``
    (N,): crop region of each base-image token (for the crop ranking; zeros with one partition);
    ``sizes``: tokens per partition; ``has_newlines``: whether any position is a newline.
    """

    partition: torch.Tensor
    source: torch.Tensor
    region: torch.Tensor
    sizes: tuple[int, ...]
    has_newlines: bool

    @classmethod
    def of(cls, partition: torch.Tensor, source: torch.Tensor, region: torch.Tensor) -> ImageLayout:
        parts = int(partition.max()) + 1
        sizes = tuple(torch.bincount(partition[partition >= 0], minlength=parts).tolist())
        return cls(partition, source, region, sizes, bool((partition == NEWLINE).any()))


def crop_regions_of(n: int, crops: int, regions: str, grid: tuple[int, int] | None) -> torch.Tensor:
    """(n,) crop region of each base-grid token: ``"strips"`` (``j * crops // n``, the reference's
    reshape) or ``"tiles"`` (2-D footprint of crop ``(r, c)`` of the ``grid = (rows, cols)``)."""
    j = torch.arange(n)
    if regions == "strips":
        return j * crops // n
    if regions == "tiles":
        if grid is None or grid[0] * grid[1] != crops:
            raise ValueError(f"grid must be (rows, cols) with rows * cols = {crops} crops, got {grid!r}")
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"crop_regions='tiles' needs a square base grid, got {n} tokens")
        rows, cols = grid
        return (j // g * rows // g) * cols + (j % g) * cols // g
    raise ValueError(f"crop_regions must be 'strips' or 'tiles', got {regions!r}")


@dataclass(frozen=True)
class BatchLayout:
    """A batch's layouts padded to one (B, L) tensor, with each image's budget.

    Tensors: ``partition`` / ``source`` (B, L), ``region`` (B, N), ``base_row`` (B,) (the row of
    each image's base partition among the batch's tower passes), ``sizes`` (B, P) (tokens per
    partition, 0 past an image's last), ``total`` / ``base`` (B,) (the budgets below). Moved to
    the device once (:meth:`to`) and reused, so no call copies host values to the device.
    Host values: ``part_sizes`` (the same sizes per image),
    ``totals`` / ``bases`` (the budget and the base image's share, ``floor(alpha * total)``
    capped by its size), ``lengths`` (positions per image) and ``has_newlines``.
    """

    partition: torch.Tensor
    source: torch.Tensor
    region: torch.Tensor
    base_row: torch.Tensor
    sizes: torch.Tensor
    total: torch.Tensor
    base: torch.Tensor
    part_sizes: tuple[tuple[int, ...], ...]
    totals: tuple[int, ...]
    bases: tuple[int, ...]
    lengths: tuple[int, ...]
    has_newlines: bool

    @classmethod
    def build(cls, images: Sequence[ImageLayout], n: int, budget: TokenBudget, alpha: float) -> BatchLayout:
        """From host values only: no tensor is read."""
        lengths = tuple(int(im.partition.shape[0]) for im in images)
        part_sizes = tuple(im.sizes for im in images)
        width, p_max = max(lengths), max(len(s) for s in part_sizes)
        totals = tuple(budget.resolve(sum(s)) for s in part_sizes)
        bases = tuple(t if len(s) == 1 else min(math.floor(alpha * t), s[0]) for t, s in zip(totals, part_sizes))
        rows = [0]
        for s in part_sizes[:-1]:
            rows.append(rows[-1] + len(s))
        pad = [width - length for length in lengths]
        partition = torch.stack([F.pad(im.partition, (0, p), value=PAD) for im, p in zip(images, pad)])
        source = torch.stack([F.pad(im.source + r * n, (0, p)) for im, r, p in zip(images, rows, pad)])
        sizes = torch.tensor([list(s) + [0] * (p_max - len(s)) for s in part_sizes])
        region = torch.stack([im.region for im in images])
        return cls(partition, source, region, torch.tensor(rows), sizes, torch.tensor(totals), torch.tensor(bases),
                   part_sizes, totals, bases, lengths, any(im.has_newlines for im in images))  # fmt: skip

    def to(self, device: torch.device | str) -> BatchLayout:
        names = ("partition", "source", "region", "base_row", "sizes", "total", "base")
        moved = {k: getattr(self, k).to(device) for k in names}
        return dataclasses.replace(self, **moved)

    def diverse_steps(self) -> int:
        """Host bound on any partition's kept count: the number of greedy steps diverse selection runs."""
        steps = 0
        for s, total, base in zip(self.part_sizes, self.totals, self.bases):
            crops = s[1:]
            steps = max(steps, min(s[0], max(base, total - sum(crops))))
            if crops:
                steps = max(steps, min(max(crops), total - base))
        return steps


def crop_mass(base_content: torch.Tensor, region: torch.Tensor, crops: int, alpha: float) -> torch.Tensor:
    """(B, crops) float64: per image, its base image's top ``int(N * (1 - alpha))`` tokens by
    early-layer [CLS] attention (``base_content`` (B, N)) counted per crop ``region`` (B, N)."""
    b, n = base_content.shape
    k = int(n * (1 - alpha))
    mass = torch.zeros((b, crops), dtype=torch.float64, device=base_content.device)
    if k == 0 or crops == 0:
        return mass
    top = torch.topk(base_content.double(), k, dim=1).indices
    return mass.scatter_add_(1, region.gather(1, top), torch.ones_like(top, dtype=torch.float64))


def allocate_rows(remaining: torch.Tensor, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """:func:`mmaccel.runtime.budget.allocate` for every row at once, on the tensors' device.

    ``remaining`` (B,) long, ``weights`` (B, C) float64 >= 0, ``capacity`` (B, C) long. Per row the
    same float64 arithmetic as ``allocate`` (weighted groups by largest remainder, groups over
    their capacity capped and their share redistributed; then zero-weight groups by capacity), as
    ``C + 1`` masked rounds per pool instead of a loop that reads values on the host.
    """
    out = torch.zeros_like(capacity)
    remaining = torch.minimum(remaining, capacity.sum(1))
    c = capacity.shape[1]
    positions = torch.arange(c, device=capacity.device).expand_as(capacity)
    for pool in (weights, capacity.to(torch.float64)):
        for _ in range(c + 1):  # each capping round caps a group; the round after distributes
            open_ = (out < capacity) & (pool > 0)
            live = (remaining > 0) & open_.any(1)
            w = torch.where(open_, pool, torch.zeros_like(pool))
            total_w = w.sum(1, keepdim=True)
            share = w / torch.where(total_w > 0, total_w, torch.ones_like(total_w)) * remaining[:, None].to(w.dtype)
            room = capacity - out
            full = open_ & (share >= room.to(share.dtype)) & live[:, None]
            capping = full.any(1)
            remaining = remaining - torch.where(full, room, torch.zeros_like(room)).sum(1)
            out = torch.where(full, capacity, out)
            final = live & ~capping
            base = share.floor().to(torch.long)
            rest = remaining - base.sum(1)
            frac = torch.where(open_, share - base.to(share.dtype), torch.full_like(share, -1.0))
            order = frac.sort(dim=1, descending=True, stable=True).indices  # ties to the lower index
            rank = torch.empty_like(order).scatter_(1, order, positions)
            add = base + (rank < rest[:, None]).to(torch.long)
            out = torch.where(final[:, None], out + add, out)
            remaining = torch.where(final, torch.zeros_like(remaining), remaining)
    return out


def top_in_partition(partition: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B, L) keep mask: in each partition ``p`` the ``kept[:, p]`` tokens of highest ``scores``
    (ties: the lower position first, as a stable sort); newline and padding positions are not kept."""
    b, length = partition.shape
    p = kept.shape[1]
    part = torch.where(partition >= 0, partition, torch.full_like(partition, p))
    by_score = scores.sort(dim=1, descending=True, stable=True).indices
    grouped, by_part = part.gather(1, by_score).sort(dim=1, stable=True)
    order = by_score.gather(1, by_part)
    counts = torch.zeros((b, p + 1), dtype=torch.long, device=partition.device)
    counts.scatter_add_(1, part, torch.ones_like(part))
    start = counts.cumsum(1) - counts
    rank = torch.arange(length, device=partition.device)[None] - start.gather(1, grouped)
    limit = torch.cat([kept, torch.zeros_like(kept[:, :1])], 1).gather(1, grouped)
    return torch.zeros_like(partition, dtype=torch.bool).scatter_(1, order, rank < limit)


def diverse_in_partition(
    partition: torch.Tensor, features: torch.Tensor, kept: torch.Tensor, sizes: torch.Tensor, n: int, steps: int
) -> torch.Tensor:
    """(B, L) keep mask: in each partition ``p``, ``kept[:, p]`` tokens chosen by DivPrune's greedy
    max-min diversity of ``features`` (B, L, D) under cosine distance: first the token farthest from
    its nearest neighbour, then repeatedly the token whose distance to the chosen set is largest
    (ties: the lower position). Distances are computed inside each partition only (P blocks of
    n x n; ``sizes`` (B, P) tokens per partition, ``n`` a host int >= each); ``steps`` (a host int >=
    every ``kept``) is the number of greedy rounds; a partition that has its count takes no more."""
    b, length = partition.shape
    p = kept.shape[1]
    device = partition.device
    # Gather each partition's tokens (raster order) into a (B, P, n) block.
    part = torch.where(partition >= 0, partition, torch.full_like(partition, p))
    grouped = part.sort(dim=1, stable=True).indices
    start = sizes.cumsum(1) - sizes
    j = torch.arange(n, device=device)
    valid = j[None, None, :] < sizes[:, :, None]  # (B, P, n)
    slot = (start[:, :, None] + j[None, None, :]).clamp_max(length - 1)
    index = grouped.gather(1, slot.view(b, -1)).view(b, p, n)  # packed position of each slot
    x = F.normalize(features.float(), dim=-1)
    x = x.gather(1, index.view(b, -1, 1).expand(-1, -1, x.shape[-1])).view(b, p, n, -1)
    dist = 1.0 - x @ x.transpose(-1, -2)  # (B, P, n, n) cosine distance inside each partition
    inf = torch.full((), math.inf, device=device)  # a fill, not a host->device copy
    pair = valid[..., :, None] & valid[..., None, :] & ~torch.eye(n, dtype=torch.bool, device=device)
    nearest = torch.where(pair, dist, inf).amin(-2)  # (B, P, n): distance to the nearest other token
    selected = torch.zeros_like(valid)
    closest = torch.full((b, p, n), math.inf, device=device)  # distance to the chosen set
    count = torch.zeros_like(kept)
    for step in range(steps):
        score = torch.where(valid & ~selected, nearest if step == 0 else closest, -inf)
        pick = score.argmax(-1)  # (B, P)
        active = count < kept
        selected |= (j[None, None, :] == pick[..., None]) & active[..., None]
        count += active.to(torch.long)
        row = dist.gather(2, pick[..., None, None].expand(b, p, 1, n)).squeeze(2)  # distances from each pick
        closest = torch.where(active[..., None], torch.minimum(closest, row), closest)
    keep = torch.zeros((b, length + 1), dtype=torch.long, device=device)
    target = torch.where(valid, index, torch.full_like(index, length)).view(b, -1)  # empty slots: a spare column
    keep.scatter_add_(1, target, (selected & valid).view(b, -1).to(torch.long))
    return keep[:, :length] > 0


def with_newlines(partition: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` plus each ``image_newline`` that closes a row keeping a token. A newline closes the
    tokens since the previous one; in multi-partition images the base image precedes the crop
    grid without newlines and belongs to no row."""
    newline = partition == NEWLINE
    nl = newline.to(torch.long)
    row = nl.cumsum(1) - nl
    multi = (partition > 0).any(1, keepdim=True)
    in_row = (partition >= 0) & ((partition != 0) | ~multi)
    hits = torch.zeros((partition.shape[0], partition.shape[1] + 1), dtype=torch.long, device=partition.device)
    hits.scatter_add_(1, row, (in_row & keep).to(torch.long))
    return keep | (newline & (hits.gather(1, row) > 0))


def select_batch(
    layout: BatchLayout,
    content: torch.Tensor,
    select: torch.Tensor | None,
    alpha: float,
    keep_newlines: bool = True,
    features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HiRED's selection for a batch: returns ``keep`` (B, L) and ``kept`` (B, P) on the device.

    ``layout`` on the scores' device; ``content`` / ``select`` (parts, N): early- / select-layer
    [CLS] attention of every tower pass (``[CLS]`` column dropped). With ``features`` (B, L, D),
    the packed projected features, tokens are picked by max-min diversity instead of ``select``.
    """
    crops = layout.sizes.shape[1] - 1
    totals, bases = layout.total, layout.base
    base_content = content.index_select(0, layout.base_row)
    mass = crop_mass(base_content, layout.region, crops, alpha)
    kept_crops = allocate_rows(totals - bases, mass, layout.sizes[:, 1:])
    kept = torch.cat([bases[:, None], kept_crops], 1)
    kept[:, 0] += totals - kept.sum(1)  # crops full: the base takes the rest (fits, total <= L)
    if features is None:
        if select is None:
            raise ValueError("select scores are needed unless features are given (diverse selection)")
        scores = torch.take(select, layout.source)
        keep = top_in_partition(layout.partition, scores, kept)
    else:
        if features.shape[:2] != layout.partition.shape:
            raise ValueError(f"features must be (B, L, D) = {tuple(layout.partition.shape)} x D, got {tuple(features.shape)}")
        n = max(max(s) for s in layout.part_sizes)
        keep = diverse_in_partition(layout.partition, features, kept, layout.sizes, n, layout.diverse_steps())
    if keep_newlines and layout.has_newlines:
        keep = with_newlines(layout.partition, keep)
    return keep, kept
