"""Static block-sparse attention masks for video, as peers of SVG2 in the benchmarks.

Each builder returns a `StaticMask`: a token order (which tokens form each block of ``block``
tokens; per head) and a block mask ``(H, nb, nb)`` over that order, at a requested density
(fraction of query-key pairs kept; with whole blocks, the kept block fraction). `run_block_mask`
executes one through ``flex_attention`` with a ``BlockMask`` of full blocks, as SVG2's flex
backend does. The rules (our own code, written from the papers and the authors' repositories):

* **sliding tile** (STA, Zhang et al. 2025, hao-ai-lab/FastVideo): tokens are reordered into 3-D
  tiles of ``tile = (t, h, w)`` tokens (one tile = one block); a query tile attends to the key
  tiles inside a ``(kt, kh, kw)`` window of tiles centred on it, the centre clamped so the
  window stays inside the video (every query tile sees exactly ``kt * kh * kw`` tiles).
* **radial** (Radial Attention, Li et al. 2025, mit-han-lab/radial-attention): raster order;
  for query frame ``i`` and key frame ``j`` at distance ``d = |i - j|``: ``d = 0`` and key frame
  0 (attention sink) are dense; otherwise a diagonal band (in-frame raster position) of
  half-width ``decay * 2**bit_length(T) / 2**bit_length(d)`` tokens (``T`` tokens per frame),
  at least one block; when that width falls below a block, only frame pairs with
  ``d % (block / width) == 0`` are kept. The reference keeps ``d = 1`` at ``T / 2``
  (Wan) and the split test ignores ``decay``; here ``decay`` scales every band, so one
  parameter sets the density.
* **SVG1 spatial/temporal heads** (Sparse VideoGen, Xi et al. 2025, svg-project/Sparse-VideoGen):
  a spatial head keeps a band of blocks around the diagonal in raster (frame-major) order, i.e.
  its own frame and its neighbours; a temporal head keeps the same band in space-major order
  (``(y, x, t)``), i.e. the same and nearby spatial positions in every frame. Per head the kind
  is chosen online as SVG1 does: attention of ``rows`` sampled queries computed densely and
  under both masks, the mask with the lower mean squared error wins (`profile_svg1_heads`).

Densities are discrete (whole blocks, tiles or bands): each builder picks the parameter whose
density is closest to the target and reports the density reached.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from mmaccel.sparse_attn.backends import compiled_flex, flex_kernel_options

__all__ = [
    "StaticMask",
    "VideoGrid",
    "band_mask",
    "profile_svg1_heads",
    "radial_mask",
    "run_block_mask",
    "sliding_tile_mask",
    "svg1_mask",
]


@dataclass(frozen=True)
class VideoGrid:
    """A ``frames x rows x cols`` video token grid in raster order (frame, row, col)."""

    frames: int
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.frames * self.rows * self.cols

    @property
    def per_frame(self) -> int:
        return self.rows * self.cols

    def raster(self) -> torch.Tensor:
        """(S,) identity order."""
        return torch.arange(self.tokens)

    def space_major(self) -> torch.Tensor:
        """(S,) raster index of the token at each position of the (row, col, frame) order."""
        t, y, x = torch.meshgrid(
            torch.arange(self.frames), torch.arange(self.rows), torch.arange(self.cols), indexing="ij"
        )
        return (t * self.per_frame + y * self.cols + x).permute(1, 2, 0).reshape(-1)

    def tile_major(self, tile: tuple[int, int, int]) -> torch.Tensor:
        """(S,) raster index of the token at each position of the tile order: tiles in raster order
        over the tile grid, tokens raster within a tile."""
        tt, th, tw = tile
        if self.frames % tt or self.rows % th or self.cols % tw:
            raise ValueError(f"tile {tile} must divide the grid {(self.frames, self.rows, self.cols)}")
        idx = torch.arange(self.tokens).view(self.frames // tt, tt, self.rows // th, th, self.cols // tw, tw)
        return idx.permute(0, 2, 4, 1, 3, 5).reshape(-1)


@dataclass(frozen=True)
class StaticMask:
    """``order`` (H, S): raster index of the token at each position; ``blocks`` (H, nb, nb) bool
    over positions grouped ``block`` at a time; ``param``: the rule's parameter picked."""

    name: str
    order: torch.Tensor
    blocks: torch.Tensor
    block: int
    param: object

    @property
    def density(self) -> float:
        return self.blocks.float().mean().item()


def _check_blocks(grid: VideoGrid, block: int) -> int:
    if grid.tokens % block:
        raise ValueError(f"block {block} must divide the {grid.tokens} tokens")
    return grid.tokens // block


def _tile_window(grid_tiles: tuple[int, ...], window: tuple[int, ...]) -> torch.Tensor:
    """(n, n) bool over tiles (raster over the tile grid): key tile inside the query's clamped window."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid_tiles), indexing="ij"), -1).reshape(
        -1, len(grid_tiles)
    )
    g, k = torch.tensor(grid_tiles), torch.tensor(window)
    lo = (coords - k // 2).clamp(min=torch.zeros_like(g)).minimum(g - k)  # window start, clamped inside
    return ((coords[None] >= lo[:, None]) & (coords[None] < lo[:, None] + k)).all(-1)


def sliding_tile_mask(
    grid: VideoGrid, density: float, heads: int, tile: tuple[int, int, int] = (2, 4, 4)
) -> StaticMask:
    """STA at the window (in tiles) whose density ``kt*kh*kw / tiles`` is closest to ``density``;
    ties go to the most cube-like window (smallest max/min side ratio)."""
    block = math.prod(tile)
    order = grid.tile_major(tile)
    grid_tiles = (grid.frames // tile[0], grid.rows // tile[1], grid.cols // tile[2])
    n = math.prod(grid_tiles)
    best = min(
        itertools.product(*(range(1, g + 1) for g in grid_tiles)),
        key=lambda w: (abs(math.prod(w) / n - density), max(w) / min(w)),
    )
    blocks = _tile_window(grid_tiles, best)
    return StaticMask("sliding tile", order.expand(heads, -1), blocks.expand(heads, -1, -1), block, best)


def _radial_blocks(grid: VideoGrid, block: int, decay: float) -> torch.Tensor:
    per_frame = grid.per_frame
    if per_frame % block:
        raise ValueError(f"block {block} must divide the {per_frame} tokens per frame")
    fb = per_frame // block  # blocks per frame
    local = torch.arange(fb)
    gap = (local[:, None] - local[None, :]).abs() * block  # in-frame raster distance between blocks
    nf = grid.frames
    out = torch.zeros(nf, fb, nf, fb, dtype=torch.bool)
    for i in range(nf):
        for j in range(nf):
            d = abs(i - j)
            if d == 0 or j == 0:
                out[i, :, j, :] = True
                continue
            width = decay * 2 ** per_frame.bit_length() / 2 ** d.bit_length()
            if width < block:
                if d % max(int(block / width), 1):
                    continue
                width = block
            out[i, :, j, :] = gap <= width
    return out.view(nf * fb, nf * fb)


def radial_mask(grid: VideoGrid, density: float, heads: int, block: int = 32) -> StaticMask:
    """Radial energy-decay mask with ``decay`` bisected (log scale) to the density closest to
    ``density``. The dense diagonal frames and the sink frame set a floor of ``(2F - 1) / F^2``."""
    _check_blocks(grid, block)
    lo, hi = 1e-4, 1e2
    candidates = []
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        blocks = _radial_blocks(grid, block, mid)
        dens = blocks.float().mean().item()
        candidates.append((abs(dens - density), mid, blocks))
        lo, hi = (mid, hi) if dens < density else (lo, mid)
    _, decay, blocks = min(candidates, key=lambda c: c[0])
    return StaticMask("radial", grid.raster().expand(heads, -1), blocks.expand(heads, -1, -1), block, decay)


def band_mask(nb: int, half_width: int) -> torch.Tensor:
    """(nb, nb) bool: blocks within ``half_width`` of the diagonal."""
    idx = torch.arange(nb)
    return (idx[:, None] - idx[None, :]).abs() <= half_width


def _svg1_band(nb: int, density: float) -> int:
    """The band half-width whose density ``(nb (2w + 1) - w (w + 1)) / nb^2`` is closest."""
    return min(range(nb), key=lambda w: abs((nb * (2 * w + 1) - w * (w + 1)) / nb**2 - density))


def svg1_mask(grid: VideoGrid, density: float, temporal: torch.Tensor, block: int = 32) -> StaticMask:
    """SVG1 heads: ``temporal`` (H,) bool picks space-major order for a head, else raster; the
    same diagonal band of blocks (half-width closest to ``density``) in each head's order."""
    nb = _check_blocks(grid, block)
    w = _svg1_band(nb, density)
    order = torch.where(temporal[:, None], grid.space_major()[None], grid.raster()[None])
    blocks = band_mask(nb, w).expand(temporal.numel(), -1, -1)
    return StaticMask("SVG1 spatial/temporal", order, blocks, block, w)


def _token_allowed(order: torch.Tensor, band: int, block: int, queries: torch.Tensor) -> torch.Tensor:
    """(len(queries), S) bool: keys a raster-index query may attend under a band in ``order``."""
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())  # raster index -> position
    qb, kb = pos[queries] // block, pos // block
    return (qb[:, None] - kb[None, :]).abs() <= band


def profile_svg1_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: VideoGrid, density: float,
    block: int = 32, rows: int = 64, seed: int = 0,
) -> torch.Tensor:  # fmt: skip
    """SVG1's online choice: for ``rows`` sampled query tokens (the same for every head), the
    attention output densely and under the spatial and the temporal band; per head (of batch
    element 0) True (temporal) where the temporal mask's mean squared error is lower. (H,) bool."""
    nb = _check_blocks(grid, block)
    w = _svg1_band(nb, density)
    idx = torch.randperm(grid.tokens, generator=torch.Generator().manual_seed(seed))[:rows]
    qs, kf, vf = q[0, :, idx].float(), k[0].float(), v[0].float()
    logits = qs @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (H, rows, S)
    dense = torch.softmax(logits, -1) @ vf
    errors = []
    for order in (grid.raster(), grid.space_major()):
        allowed = _token_allowed(order, w, block, idx)
        out = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vf
        errors.append((out - dense).pow(2).mean((-1, -2)))
    return errors[1] < errors[0]


def run_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: StaticMask, compiled: bool = True
) -> torch.Tensor:
    """Attention of ``q, k, v`` (B, H, S, D) under ``mask`` through ``flex_attention``: tokens
    permuted into the mask's order per head, every kept block a full block (no element mask),
    the output permuted back. ``compiled=False`` runs flex_attention eagerly (tests; the eager path
    applies the block mask through the element mask)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, h, s, d = q.shape
    order = mask.order.to(q.device)
    index = order.view(1, h, s, 1)
    qp, kp, vp = (torch.gather(x, 2, index.expand(b, -1, -1, x.shape[-1])) for x in (q, k, v))
    full = mask.blocks.to(q.device).expand(b, -1, -1, -1)
    full_num = full.sum(-1, dtype=torch.int32)
    full_idx = torch.argsort(full.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    blocks, size = mask.blocks.to(q.device), mask.block

    def mask_mod(b, h, q_idx, kv_idx):  # never evaluated on full blocks by the compiled kernel
        return blocks[h, q_idx // size, kv_idx // size]

    block_mask = BlockMask.from_kv_blocks(
        torch.zeros_like(full_num), torch.zeros_like(full_idx), full_num, full_idx.contiguous(),
        BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(s, s),
    )  # fmt: skip
    tiles = flex_kernel_options(size, size, q.device) if compiled else None
    attend = compiled_flex() if compiled else flex_attention
    out = attend(qp, kp, vp, block_mask=block_mask, kernel_options=tiles)
    return torch.empty_like(out).scatter_(2, index.expand(b, -1, -1, out.shape[-1]), out)
