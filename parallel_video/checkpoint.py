"""Per-clip denoising checkpoints: a killed run resumes from the last step every rank finished.

Each rank writes ``clip{rank}of{world}_step{k}.pt`` (its clip's latents and the scheduler's
state after step ``k``) atomically behind a SHA-256 header (:mod:`mmaccel.runtime.checkpoint_io`)
and keeps its last three: ranks work in lockstep and can be at most one step apart when a peer
dies, and a corrupt newest file falls back to the one before it. Files hold only tensors and
plain values and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from mmaccel.runtime.checkpoint_io import load_verified, newest_valid, save_verified, settings_diff, verify

__all__ = [
    "available_steps", "clear", "load_step", "newest_loadable_step", "restore_scheduler", "save_step",
    "scheduler_state",
]  # fmt: skip

_KEEP = 3
_PLAIN = (Tensor, int, float, bool, str, type(None))


def _name(rank: int, world_size: int, step: int) -> str:
    return f"clip{rank}of{world_size}_step{step:05d}.pt"


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's mutable state (everything but its frozen config) as plain values.

    Raises ``TypeError`` for a scheduler holding something else (e.g. a model as ``solver_p``).
    """
    state = {k: v for k, v in vars(scheduler).items() if k != "_internal_dict"}
    odd = sorted(k for k, v in state.items() if not _is_plain(v))
    if odd:
        raise TypeError(
            f"cannot checkpoint {type(scheduler).__name__}: attributes {odd} are not tensors or plain values"
        )
    return state


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    """Put ``state`` (from :func:`scheduler_state`) back into ``scheduler``."""
    for key, value in state.items():
        setattr(scheduler, key, value)


def save_step(
    directory: Path,
    rank: int,
    world_size: int,
    step: int,
    latents: Tensor,
    scheduler: Any,
    meta: dict[str, Any],
) -> Path:
    """Write this rank's state after ``step`` atomically and drop its checkpoints older than the last three."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _name(rank, world_size, step)
    payload = {
        "meta": meta,
        "step": step,
        "latents": latents.detach().cpu(),
        "scheduler": scheduler_state(scheduler),
    }
    save_verified(payload, path)
    for old in available_steps(directory, rank, world_size)[:-_KEEP]:
        (directory / _name(rank, world_size, old)).unlink(missing_ok=True)
    return path


def available_steps(directory: Path, rank: int, world_size: int) -> list[int]:
    """Steps this rank has a checkpoint for, ascending."""
    pattern = re.compile(rf"clip{rank}of{world_size}_step(\d+)\.pt")
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.fullmatch(p.name)))


def newest_loadable_step(directory: Path, rank: int, world_size: int, warn: Callable[[str], None]) -> int:
    """This rank's newest step whose checkpoint is intact (0: none); each corrupt newer one is
    reported through ``warn`` in one line and skipped."""
    paths = {directory / _name(rank, world_size, s): s for s in available_steps(directory, rank, world_size)}
    found = newest_valid(list(paths), load=verify, warn=warn)
    return 0 if found is None else paths[found[0]]


def load_step(
    directory: Path, rank: int, world_size: int, step: int, meta: dict[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    """This rank's latents and scheduler state after ``step``; ``ValueError`` naming the settings
    that differ if another run wrote it."""
    path = directory / _name(rank, world_size, step)
    if not path.is_file():
        raise FileNotFoundError(f"rank {rank}: no checkpoint for step {step} in {directory}")
    payload = load_verified(path)
    if payload["meta"] != meta:
        changed = "; ".join(settings_diff(payload["meta"], meta))
        raise ValueError(
            f"{path} was written by a run with other settings ({changed}); "
            "rerun with the same settings or without --resume"
        )
    return payload["latents"], payload["scheduler"]


def clear(directory: Path, rank: int, world_size: int) -> None:
    """Delete this rank's checkpoints (a fresh, non-resumed run)."""
    for step in available_steps(directory, rank, world_size):
        (directory / _name(rank, world_size, step)).unlink(missing_ok=True)
