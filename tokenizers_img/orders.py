"""Decoding orders for image-token grids and the attention masks that go with them.

A :class:`Schedule` lists forward passes. Step ``s`` feeds already-decoded cells (their keys and
values go to the KV cache at their raster positions) and predicts ``targets`` from the row head
and/or column head of the fed cells. Every cell carries a *group*; a token may attend to the
condition tokens and to every image token whose group is <= its own. Groups are:

- raster (LlamaGen): the raster index, so the mask is causal; ``H * W`` forwards;
- NAR (He et al., "Neighboring Autoregressive Modeling for Efficient Visual Generation", 2025):
  the diagonal ``h + w`` (the *proximity mask*); ``H + W - 1`` forwards;
- PAR-style (Wang et al., "Parallelized Autoregressive Visual Generation", 2024): the index
  inside each of ``r x r`` regions, first tokens of the regions one at a time;
  ``H * W / r^2 + r^2 - 1`` forwards.

The same :func:`group_mask` is the training mask and the inference mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Step",
    "Schedule",
    "raster_schedule",
    "nar_schedule",
    "par_schedule",
    "group_mask",
    "proximity_mask",
    "check_grid",
]


def check_grid(height: object, width: object) -> tuple[int, int]:
    """Validate a token grid ``(height, width)`` of positive ints."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"grid {name} must be an int >= 1, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"grid {name} must be >= 1, got {value}")
    return height, width


@dataclass(frozen=True)
class Step:
    """One forward pass.

    ``inputs``: raster indices fed (empty for the first step, which feeds the condition).
    ``targets``: raster indices predicted. ``row_src`` / ``col_src``: per target, the index into
    ``inputs`` whose row / column head predicts it, or -1; in the first step index 0 is the
    last condition token. A target with both uses the mean of the two logits.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    row_src: torch.Tensor
    col_src: torch.Tensor


@dataclass(frozen=True)
class Schedule:
    """A decoding order over an ``height x width`` grid: per-cell groups and the forward passes."""

    name: str
    height: int
    width: int
    groups: torch.Tensor
    steps: tuple[Step, ...]

    @property
    def forward_passes(self) -> int:
        return len(self.steps)

    @property
    def uses_column_head(self) -> bool:
        return any(bool((s.col_src >= 0).any()) for s in self.steps)

    def mask(self, n_cond: int) -> torch.Tensor:
        """The attention mask of this order over ``[condition, raster tokens]``."""
        return group_mask(self.groups, n_cond)


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def group_mask(groups: torch.Tensor, n_cond: int) -> torch.Tensor:
    """Bool ``[n_cond + N, n_cond + N]`` (True = may attend) for raster-ordered cell ``groups [N]``.

    Condition tokens are causal among themselves; an image token sees every condition token and
    every image token whose group is <= its own (including itself).
    """
    n = groups.numel()
    mask = torch.ones(n_cond + n, n_cond + n, dtype=torch.bool).tril()
    mask[n_cond:, n_cond:] = groups[None, :] <= groups[:, None]
    return mask


def proximity_mask(height: int, width: int, n_cond: int) -> torch.Tensor:
    """NAR's mask: a token on diagonal ``c = h + w`` sees all tokens on diagonals <= c."""
    height, width = check_grid(height, width)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return group_mask((rows + cols).flatten(), n_cond)


def raster_schedule(height: int, width: int) -> Schedule:
    """One token per forward in raster order; the row head is the next-token head."""
    height, width = check_grid(height, width)
    n = height * width
    steps = [Step(_long([]), _long([0]), _long([0]), _long([-1]))] + [
        Step(_long([r - 1]), _long([r]), _long([0]), _long([-1])) for r in range(1, n)
    ]
    return Schedule("raster", height, width, torch.arange(n), tuple(steps))


def nar_schedule(height: int, width: int) -> Schedule:
    """Diagonal ``c`` (all ``h + w = c``) in one forward: ``height + width - 1`` forwards.

    Step ``c`` feeds diagonal ``c - 1`` (rows ascending); target ``(h, w)`` takes the row head of
    its left neighbour ``(h, w - 1)`` and the column head of the one above ``(h - 1, w)``.
    """
    height, width = check_grid(height, width)

    def diagonal(c: int) -> list[tuple[int, int]]:
        return [(h, c - h) for h in range(max(0, c - width + 1), min(c, height - 1) + 1)]

    steps = [Step(_long([]), _long([0]), _long([0]), _long([0]))]
    for c in range(1, height + width - 1):
        fed = {cell: k for k, cell in enumerate(diagonal(c - 1))}
        targets = diagonal(c)
        steps.append(
            Step(
                _long([h * width + w for h, w in fed]),
                _long([h * width + w for h, w in targets]),
                _long([fed.get((h, w - 1), -1) for h, w in targets]),
                _long([fed.get((h - 1, w), -1) for h, w in targets]),
            )
        )
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return Schedule("nar", height, width, (rows + cols).flatten(), tuple(steps))


def par_schedule(height: int, width: int, regions: int = 2) -> Schedule:
    """PAR-style: ``regions x regions`` blocks decoded in parallel, one token per block per forward.

    The first token of each block is decoded one at a time; then each forward feeds the blocks'
    previous tokens and predicts their next ones (block-local raster order) with the row head.
    Needs ``height`` and ``width`` divisible by ``regions``.
    """
    height, width = check_grid(height, width)
    if isinstance(regions, bool) or not isinstance(regions, int) or regions < 1:
        raise ValueError(f"regions must be an int >= 1, got {regions!r}")
    if height % regions or width % regions:
        raise ValueError(f"grid {height}x{width} must be divisible by regions={regions}")
    bh, bw = height // regions, width // regions
    n_blocks = regions * regions

    def cell(block: int, local: int) -> int:
        (bi, bj), (li, lj) = divmod(block, regions), divmod(local, bw)
        return (bi * bh + li) * width + bj * bw + lj

    groups = torch.empty(height * width, dtype=torch.long)
    for b in range(n_blocks):
        groups[cell(b, 0)] = b
        for local in range(1, bh * bw):
            groups[cell(b, local)] = n_blocks - 1 + local
    steps = [Step(_long([]), _long([cell(0, 0)]), _long([0]), _long([-1]))]
    steps += [
        Step(_long([cell(b - 1, 0)]), _long([cell(b, 0)]), _long([0]), _long([-1]))
        for b in range(1, n_blocks)
    ]
    everyone = _long(list(range(n_blocks)))
    for local in range(1, bh * bw):
        steps.append(
            Step(
                _long([cell(b, local - 1) for b in range(n_blocks)]),
                _long([cell(b, local) for b in range(n_blocks)]),
                everyone,
                _long([-1] * n_blocks),
            )
        )
    return Schedule(f"par-{n_blocks}x", height, width, groups, tuple(steps))
