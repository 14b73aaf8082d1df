"""Which latent frames each rank owns and which frames it sees in dual-scope attention.

Pure bookkeeping (no processes, no tensors of activations), so it is unit-testable on its own
and shared by the distributed attention processor and the single-process reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmaccel.runtime.budget import allocate

__all__ = ["ClipPlan", "latent_frame_count"]


def latent_frame_count(num_frames: int, temporal_stride: int) -> int:
    """Latent frames of a causal video VAE: ``1 + (num_frames - 1) / stride``.

    Raises ``ValueError`` unless ``num_frames - 1`` is divisible by ``temporal_stride`` (the
    plain pipeline silently rounds instead).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"frames must be a positive int, got {num_frames!r}")
    if (num_frames - 1) % temporal_stride:
        lower = (num_frames - 1) // temporal_stride * temporal_stride + 1
        raise ValueError(
            f"frames - 1 must be divisible by the VAE's temporal stride {temporal_stride}, got frames="
            f"{num_frames}; use {lower} or {lower + temporal_stride}"
        )
    return (num_frames - 1) // temporal_stride + 1


@dataclass(frozen=True)
class ClipPlan:
    """Contiguous, balanced clips of ``num_frames`` latent frames, one per rank.

    ``clips[r] = (start, end)``; ``padding`` frames of K/V come from each existing neighbour
    (local scope) and ``global_indices`` are the frames sampled uniformly over the whole video
    whose K/V every rank all-gathers (global scope).
    """

    num_frames: int
    world_size: int
    padding: int
    clips: tuple[tuple[int, int], ...]
    global_indices: tuple[int, ...]

    @classmethod
    def build(cls, num_frames: int, world_size: int, padding: int, global_frames: int) -> ClipPlan:
        """Split ``num_frames`` latent frames over ``world_size`` ranks and sample the global frames."""
        if world_size > num_frames:
            raise ValueError(
                f"more ranks ({world_size}) than latent frames ({num_frames}): every rank needs a clip of "
                "at least one latent frame; use fewer ranks or more frames"
            )
        sizes = allocate(num_frames, torch.ones(world_size), torch.full((world_size,), num_frames)).tolist()
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + int(size))
        clips = tuple(zip(bounds[:-1], bounds[1:]))
        shortest = min(int(s) for s in sizes)
        if world_size > 1 and padding > shortest:
            raise ValueError(
                f"padding={padding} is larger than the shortest clip ({shortest} latent frames for "
                f"{num_frames} frames on {world_size} ranks); use padding <= {shortest}"
            )
        if global_frames > num_frames:
            raise ValueError(
                f"global_frames={global_frames} exceeds the {num_frames} latent frames of the video"
            )
        if global_frames == 0:
            indices: tuple[int, ...] = ()
        elif global_frames == 1:
            indices = (num_frames // 2,)
        else:
            indices = tuple(
                sorted({round(i * (num_frames - 1) / (global_frames - 1)) for i in range(global_frames)})
            )
        return cls(num_frames, world_size, padding, clips, indices)

    def window(self, rank: int) -> tuple[int, int]:
        """Frames ``[lo, hi)`` of rank ``rank``'s local scope: its clip plus the neighbours' halos."""
        start, end = self.clips[rank]
        lo = start - self.padding if rank > 0 else start
        hi = end + self.padding if rank < self.world_size - 1 else end
        return lo, hi

    def owned_globals(self, rank: int) -> tuple[int, ...]:
        """Global frames inside rank ``rank``'s clip, as indices into the video."""
        start, end = self.clips[rank]
        return tuple(i for i in self.global_indices if start <= i < end)

    def extra_globals(self, rank: int) -> tuple[int, ...]:
        """Global frames outside rank ``rank``'s local window: the keys it adds for global scope.

        Global frames inside the window are already local keys, so each frame is a key once.
        """
        lo, hi = self.window(rank)
        return tuple(i for i in self.global_indices if not lo <= i < hi)
