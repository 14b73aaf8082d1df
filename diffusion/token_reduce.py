"""Token reducers on (frames, height, width) grids: average pooling and ToMe-style merging.

A reducer maps the ``N = F * H * W`` tokens of a flattened grid (row-major ``f h w``, the
order DiT, PixArt, Wan and CogVideoX patch embeddings produce) to ``M < N`` tokens and back:

- :class:`GridPool` averages non-overlapping ``(pf, ph, pw)`` windows (FlexDiT's sparse
  tokens, arXiv:2412.06028) and expands by nearest or (bi/tri)linear upsampling.
- :class:`BipartiteMerge` is bipartite soft matching with one random destination per cell
  (ToMe for Stable Diffusion, arXiv:2303.17604): the most similar source tokens are averaged
  into their destination; expansion copies a destination's value back to its sources.

Both also reduce rotary tables consistently with the tokens (:meth:`reduce_rotary`).
2-D images are grids with ``F = 1``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

__all__ = [
    "Grid",
    "GridPool",
    "BipartiteMerge",
    "check_divides",
    "merge_positions",
    "pool_factors_at_most",
    "MAX_ROTARY_POOL",
]

Grid = tuple[int, int, int]

#: Largest per-axis window whose rotary phases are averaged exactly (see `GridPool.reduce_rotary`).
MAX_ROTARY_POOL = 6


def check_divides(factor: Grid, grid: Grid, name: str = "factor") -> None:
    """``ValueError`` naming ``name`` unless every ``factor[i]`` divides ``grid[i]``."""
    for axis, f, g in zip(("frames", "height", "width"), factor, grid):
        if g % f:
            raise ValueError(
                f"{name} {tuple(factor)} must divide the token grid (frames, height, width) = {tuple(grid)}; "
                f"{axis} factor {f} does not divide {g}"
            )


def pool_factors_at_most(factor: Grid) -> list[Grid]:
    """Every per-axis divisor combination of ``factor``, densest first.

    Ties in keep ratio are ordered so the last axes (width, then height) are pooled first.
    """
    divisors = [[d for d in range(1, f + 1) if f % d == 0] for f in factor]
    combos = list(itertools.product(*divisors))
    return sorted(combos, key=lambda c: (math.prod(c), c))


@dataclass(frozen=True)
class GridPool:
    """Average-pool ``(pf, ph, pw)`` windows of a flattened ``(F, H, W)`` token grid.

    ``expand`` maps the pooled tokens back to the full grid by ``"nearest"`` (repeat each
    pooled token over its window) or ``"linear"`` (bilinear for 2-D, trilinear for video,
    ``align_corners=False``).
    """

    grid: Grid
    factor: Grid
    expand_mode: str = "nearest"

    def __post_init__(self) -> None:
        check_divides(self.factor, self.grid)
        if self.expand_mode not in ("nearest", "linear"):
            raise ValueError(f"expand_mode must be 'nearest' or 'linear', got {self.expand_mode!r}")

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid) // math.prod(self.factor)

    @property
    def pooled_grid(self) -> Grid:
        return tuple(g // f for g, f in zip(self.grid, self.factor))  # type: ignore[return-value]

    def _axes(self) -> dict[str, int]:
        (f, h, w), (a, b, c) = self.pooled_grid, self.factor
        return dict(f=f, h=h, w=w, a=a, b=b, c=c)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, M, C)``: mean over each window."""
        return reduce(x, "b (f a h b2 w c) d -> b (f h w) d", "mean", **_rename(self._axes()))

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, M, C) -> (B, N, C)``."""
        if self.expand_mode == "nearest":
            return repeat(y, "b (f h w) d -> b (f a h b2 w c) d", **_rename(self._axes()))
        f, h, w = self.pooled_grid
        if self.grid[0] == 1:  # images: bilinear on a 4-D tensor
            z = rearrange(y, "b (h w) d -> b d h w", h=h, w=w)
            z = F.interpolate(z, size=self.grid[1:], mode="bilinear", align_corners=False)
            return rearrange(z, "b d h w -> b (h w) d")
        z = rearrange(y, "b (f h w) d -> b d f h w", f=f, h=h, w=w)
        z = F.interpolate(z, size=self.grid, mode="trilinear", align_corners=False)
        return rearrange(z, "b d f h w -> b (f h w) d")

    def add_expanded(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x + expand(delta)``; nearest expansion broadcasts instead of materialising the repeat."""
        if self.expand_mode != "nearest":
            return x + self.expand(delta)
        (f, h, w), (a, b, c) = self.pooled_grid, self.factor
        xs = x.reshape(x.shape[0], f, a, h, b, w, c, x.shape[-1])
        ds = delta.reshape(delta.shape[0], f, 1, h, 1, w, 1, delta.shape[-1])
        return (xs + ds).reshape(x.shape)

    def reduce_rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables ``(Bf, N, ...)`` for the window centres: the normalised mean of
        ``cos + i sin`` over each window. For angles linear in position with frequency ``w`` this
        is exactly the angle at the window's centre when ``factor * w < 2 pi`` (all RoPE
        frequencies are <= 1, hence ``factor <= MAX_ROTARY_POOL``)."""
        if max(self.factor) > MAX_ROTARY_POOL:
            raise ValueError(
                f"pooling factor {self.factor} is above {MAX_ROTARY_POOL} on some axis; rotary phases "
                "cannot be averaged exactly over such windows"
            )
        shape = cos.shape
        flat = lambda t: t.reshape(shape[0], shape[1], -1).double()  # noqa: E731
        c, s = self.reduce(flat(cos)), self.reduce(flat(sin))
        norm = torch.sqrt(c * c + s * s).clamp_min(1e-12)
        out_shape = (shape[0], self.num_tokens, *shape[2:])
        return (c / norm).reshape(out_shape).to(cos.dtype), (s / norm).reshape(out_shape).to(sin.dtype)


def merge_positions(
    grid: Grid, cell: Grid, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_pos, dst_pos)``: grid positions of the source and destination tokens of
    `BipartiteMerge`, one destination per ``cell`` (random with ``generator``, else the cell's
    first token), each sorted. Static shapes (no boolean indexing); compute once per seed."""
    check_divides(cell, grid, "cell")
    cells = math.prod(cell)
    num_cells = math.prod(grid) // cells
    if generator is None:
        local = torch.zeros(num_cells, dtype=torch.long)
    else:
        local = torch.randint(cells, (num_cells,), generator=generator)
    (fc, hc, wc), (cf, ch, cw) = (tuple(g // c for g, c in zip(grid, cell)), cell)
    pos = torch.arange(math.prod(grid)).view(fc, cf, hc, ch, wc, cw).permute(0, 2, 4, 1, 3, 5).reshape(num_cells, cells)
    dst_pos = pos.gather(1, local[:, None])[:, 0].sort().values
    is_dst = F.one_hot(local, cells)
    others = is_dst.argsort(dim=1, stable=True)[:, : cells - 1]  # the non-destination slots of each cell
    src_pos = pos.gather(1, others).flatten().sort().values
    return src_pos, dst_pos


def _rename(axes: dict[str, int]) -> dict[str, int]:
    """einops names: ``b`` is the batch, so the height window is ``b2``; ``c`` is the width window."""
    return dict(f=axes["f"], h=axes["h"], w=axes["w"], a=axes["a"], b2=axes["b"], c=axes["c"])


class BipartiteMerge:
    """ToMe bipartite soft matching on grid cells (one destination token per ``cell``).

    Built from the tokens ``metric`` (``(B, N, C)``, cosine similarity) it merges the
    ``num_merge`` source tokens most similar to a destination into it (mean). The matching is
    per batch element. ``generator`` picks the random destination inside each cell; ``None``
    takes the first token of every cell.
    """

    def __init__(
        self,
        metric: torch.Tensor,
        grid: Grid,
        cell: Grid,
        num_merge: int,
        generator: torch.Generator | None = None,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        check_divides(cell, grid, "cell")
        b, n, _ = metric.shape
        if n != math.prod(grid):
            raise ValueError(f"metric has {n} tokens but the grid {grid} has {math.prod(grid)}")
        cells = math.prod(cell)
        num_cells = n // cells
        max_merge = n - num_cells
        if not 0 <= num_merge <= max_merge:
            raise ValueError(
                f"num_merge must be in [0, {max_merge}] for cell {cell} on grid {grid}, got {num_merge}"
            )
        self.num_tokens_in = n
        self.num_merge = num_merge
        if positions is None:
            positions = merge_positions(grid, cell, generator)
        src_pos, dst_pos = (p.to(metric.device) for p in positions)

        with torch.no_grad():
            m = F.normalize(metric.float(), dim=-1)
            scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)  # (B, Ns, Nd)
            node_max, node_idx = scores.max(dim=-1)
            order = node_max.argsort(dim=-1, descending=True, stable=True)
        self._src_merged = order[:, :num_merge]  # indices into src_pos, merged away
        self._src_kept = order[:, num_merge:].sort(dim=-1).values  # kept sources, grid order
        self._dst_of_merged = node_idx.gather(1, self._src_merged)  # (B, r) index into dst_pos
        self._src_pos, self._dst_pos = src_pos, dst_pos
        self._batch = b
        # Full-grid positions of the kept tokens, in output order: kept sources then destinations.
        kept_src = src_pos[self._src_kept]
        self.kept_positions = torch.cat([kept_src, dst_pos.expand(b, -1)], dim=1)  # (B, M)

    @property
    def num_tokens(self) -> int:
        return self.num_tokens_in - self.num_merge

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, M, C)``: kept sources, then destinations averaged with their merged sources."""
        b, _, c = x.shape
        src = x[:, self._src_pos]
        dst = x[:, self._dst_pos]
        kept = src.gather(1, self._src_kept[..., None].expand(b, -1, c))
        merged = src.gather(1, self._src_merged[..., None].expand(b, -1, c))
        dst = dst.scatter_reduce(
            1, self._dst_of_merged[..., None].expand(b, -1, c), merged, "mean", include_self=True
        )
        return torch.cat([kept, dst], dim=1)

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, M, C) -> (B, N, C)``: every merged source takes its destination's value."""
        b, _, c = y.shape
        n_kept = self._src_kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(b, self.num_tokens_in, c)
        out[:, self._dst_pos] = dst
        src = y.new_empty(b, self._src_pos.numel(), c)
        src.scatter_(1, self._src_kept[..., None].expand(b, -1, c), kept)
        src.scatter_(
            1,
            self._src_merged[..., None].expand(b, -1, c),
            dst.gather(1, self._dst_of_merged[..., None].expand(b, -1, c)),
        )
        out[:, self._src_pos] = src
        return out

    def add_expanded(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x + expand(delta)``."""
        return x + self.expand(delta)

    def reduce_rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables ``(Bf, N, ...)`` at the kept tokens' own positions (``(B, M, ...)``):
        a merged token sits where its destination is."""
        idx = self.kept_positions
        take = lambda t: t.expand(idx.shape[0], *t.shape[1:])[  # noqa: E731
            torch.arange(idx.shape[0], device=idx.device)[:, None], idx
        ]
        return take(cos), take(sin)
