"""The block-wise layer pipeline's schedule (DualParal), as pure data: which block is at which step.

The video is a queue of frame blocks at staggered noise levels: iteration ``k`` admits block ``k``
(while blocks remain) and advances every block in flight by one step, so block ``b`` takes step
``s`` at iteration ``b + s`` (a FIFO diagonal). Within an iteration the blocks run newest first (DualParal's reference: each
block then finds the next block's K/V of this iteration in the cache) or oldest first (each block
finds its predecessor's freshest K/V). Every rank walks the same
:meth:`BlockSchedule.order`; rank ``r`` runs layers ``stages[r]`` of each item. Communication
lives in :mod:`mmaccel.parallel_video.layer_pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmaccel.runtime.budget import allocate

__all__ = ["ORDERS", "BlockSchedule", "split_stages"]

ORDERS = ("newest_first", "oldest_first")


def split_stages(num_layers: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """Contiguous, balanced layer ranges ``[lo, hi)``, one per rank (earlier ranks get the extra)."""
    if world_size > num_layers:
        raise ValueError(
            f"more ranks ({world_size}) than transformer blocks ({num_layers}) for a layer pipeline"
        )
    sizes = allocate(num_layers, torch.ones(world_size), torch.full((world_size,), num_layers)).tolist()
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + int(size))
    return tuple(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class BlockSchedule:
    """``num_blocks`` frame blocks, each denoised for ``steps`` steps on the FIFO diagonal.

    ``iteration_order``: ``"oldest_first"`` or ``"newest_first"``, the blocks of one iteration.
    """

    num_blocks: int
    steps: int
    iteration_order: str = "oldest_first"

    def __post_init__(self) -> None:
        for name in ("num_blocks", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.iteration_order not in ORDERS:
            raise ValueError(f"iteration_order must be one of {ORDERS}, got {self.iteration_order!r}")

    @property
    def num_iterations(self) -> int:
        return self.num_blocks + self.steps - 1

    def iteration(self, k: int) -> list[tuple[int, int]]:
        """``(block, step)`` pairs of iteration ``k``, in ``iteration_order``."""
        first = max(0, k - self.steps + 1)
        last = min(k, self.num_blocks - 1)
        items = [(b, k - b) for b in range(first, last + 1)]
        return items[::-1] if self.iteration_order == "newest_first" else items

    def order(self) -> list[tuple[int, int]]:
        """Every ``(block, step)`` work item in the order all ranks process them."""
        return [item for k in range(self.num_iterations) for item in self.iteration(k)]

    def in_flight(self, k: int) -> int:
        """Blocks in flight at iteration ``k`` (at most ``min(num_blocks, steps)``)."""
        return len(self.iteration(k))
