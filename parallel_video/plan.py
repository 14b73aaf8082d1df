"""Which latent frames each rank owns and which frames its queries see in dual-scope attention.

Pure bookkeeping (no processes, no activations), so it is unit-testable on its own and shared by
the distributed attention processor, the single-process simulation in the tests and the benchmark.

Key frames are named by their **virtual position** in the video: ``0 .. num_frames - 1`` are real
frames; with ``end_keys="zeros"`` the positions ``-padding .. -1`` and ``num_frames ..
num_frames + padding - 1`` are the all-zero K/V frames the reference pads the two video ends with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmaccel.runtime.budget import allocate

__all__ = ["END_KEYS", "GLOBAL_SAMPLING", "LOCAL_SCOPES", "ClipPlan", "latent_frame_count"]

LOCAL_SCOPES = ("band", "window")
END_KEYS = ("zeros", "none")
GLOBAL_SAMPLING = ("clip_stride", "uniform")


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


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class ClipPlan:
    """Contiguous, balanced clips of ``num_frames`` latent frames, one per rank, and their keys.

    ``clips[r] = (start, end)``. Local scope (``padding`` = p frames of K/V from each neighbour):

    * ``local_scope="band"`` (Video-Infinity's code): query frame ``i`` sees the ``2p + 1`` frames
      ``i - p .. i + p``, across clip boundaries through the neighbours' halos;
    * ``local_scope="window"``: every query of a clip sees the whole clip plus both halos.

    At the video ends ``end_keys="zeros"`` (reference) pads with ``p`` all-zero K/V frames that
    take softmax weight; ``"none"`` adds no keys there. Global scope (``global_frames`` = g):

    * ``global_sampling="clip_stride"`` (reference): each clip contributes its frames
      ``0, s, 2s, ...`` with ``s = max(len // (g // world_size), 1)`` (only frame 0 when
      ``g < world_size``); the lists are concatenated in rank order and cut to the first ``g``
      (so ``g`` larger than the video simply takes every frame).
      Every query sees all of them, also those already in its local band (a duplicate key);
    * ``global_sampling="uniform"``: ``g`` frames spread evenly over the whole video, each frame a
      key at most once (global frames inside the local window are not repeated).
    """

    num_frames: int
    world_size: int
    padding: int
    clips: tuple[tuple[int, int], ...]
    global_indices: tuple[int, ...]
    local_scope: str = "band"
    end_keys: str = "zeros"
    global_sampling: str = "clip_stride"

    @classmethod
    def build(
        cls,
        num_frames: int,
        world_size: int,
        padding: int,
        global_frames: int,
        *,
        local_scope: str = "band",
        end_keys: str = "zeros",
        global_sampling: str = "clip_stride",
    ) -> ClipPlan:
        """Split ``num_frames`` latent frames over ``world_size`` ranks and choose the global frames."""
        _choice("local_scope", local_scope, LOCAL_SCOPES)
        _choice("end_keys", end_keys, END_KEYS)
        _choice("global_sampling", global_sampling, GLOBAL_SAMPLING)
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
        if global_sampling == "uniform" and global_frames > num_frames:
            raise ValueError(
                f"global_frames={global_frames} exceeds the {num_frames} latent frames of the video"
            )
        if global_sampling == "clip_stride":
            indices = _clip_stride_indices(clips, global_frames)
        elif global_frames == 0:
            indices = ()
        elif global_frames == 1:
            indices = (num_frames // 2,)
        else:
            indices = tuple(
                sorted({round(i * (num_frames - 1) / (global_frames - 1)) for i in range(global_frames)})
            )
        return cls(num_frames, world_size, padding, clips, indices, local_scope, end_keys, global_sampling)

    def window(self, rank: int) -> tuple[int, int]:
        """Real frames ``[lo, hi)`` of rank ``rank``'s local keys: its clip plus the neighbours' halos."""
        start, end = self.clips[rank]
        lo = start - self.padding if rank > 0 else start
        hi = end + self.padding if rank < self.world_size - 1 else end
        return lo, hi

    def local_keys(self, rank: int) -> tuple[int, ...]:
        """Virtual positions of rank ``rank``'s local key frames, in key order (left halo, clip, right halo)."""
        if self.end_keys == "none":
            return tuple(range(*self.window(rank)))
        start, end = self.clips[rank]
        return tuple(range(start - self.padding, end + self.padding))

    def local_mask(self, rank: int) -> torch.Tensor:
        """Bool ``(clip frames, local keys)``: which local key frame each query frame of the clip sees."""
        start, end = self.clips[rank]
        queries = torch.arange(start, end).view(-1, 1)
        keys = torch.tensor(self.local_keys(rank), dtype=torch.long).view(1, -1)
        if self.local_scope == "window":
            return torch.ones(queries.shape[0], keys.shape[1], dtype=torch.bool)
        return (keys - queries).abs() <= self.padding

    def owned_globals(self, rank: int) -> tuple[int, ...]:
        """Distinct global frames inside rank ``rank``'s clip (what it contributes to the all-gather)."""
        start, end = self.clips[rank]
        return tuple(sorted({i for i in self.global_indices if start <= i < end}))

    def extra_globals(self, rank: int) -> tuple[int, ...]:
        """Global frames outside rank ``rank``'s local window (``uniform`` sampling's deduplicated keys)."""
        lo, hi = self.window(rank)
        return tuple(i for i in self.global_indices if not lo <= i < hi)

    def global_keys(self, rank: int) -> tuple[int, ...]:
        """Global key frames of rank ``rank``, in key order (after the local keys)."""
        if self.global_sampling == "clip_stride":
            return self.global_indices
        return self.extra_globals(rank)

    def visible_frames(self, frame: int) -> list[int]:
        """Every key frame (virtual positions, duplicates kept) query frame ``frame`` attends to."""
        rank = next(r for r, (s, e) in enumerate(self.clips) if s <= frame < e)
        start = self.clips[rank][0]
        row = self.local_mask(rank)[frame - start]
        local = [k for k, seen in zip(self.local_keys(rank), row.tolist()) if seen]
        return local + list(self.global_keys(rank))

    def owner(self, frame: int) -> int:
        """The rank whose clip holds real frame ``frame``."""
        return next(r for r, (s, e) in enumerate(self.clips) if s <= frame < e)


def _clip_stride_indices(clips: tuple[tuple[int, int], ...], global_frames: int) -> tuple[int, ...]:
    """Video-Infinity's rule: per clip every ``len // share``-th frame, concatenated, first ``g`` kept."""
    share = global_frames // len(clips)
    picked: list[int] = []
    for start, end in clips:
        length = end - start
        stride = max(length // share, 1) if share else length
        picked.extend(range(start, end, stride))
    return tuple(picked[:global_frames])
