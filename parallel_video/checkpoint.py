"""Denoising checkpoints: a killed run resumes from the last point every rank finished.

Clip mode: each rank writes ``clip{rank}of{world}_step{k}.pt`` (its clip's latents and the
scheduler's state after step ``k``). Pipeline mode (the DualParal layer pipeline): each rank
writes ``pipe{rank}of{world}_iter{n}.pt``, its part of the driver's state after ``n`` iterations
of the block schedule (:func:`save_iteration`; what it holds is listed in
:func:`mmaccel.parallel_video.layer_pipeline.run_layer_pipeline`). Files are written atomically
behind a SHA-256 header (:mod:`mmaccel.runtime.checkpoint_io`) and each rank keeps its last
three: ranks can be at most one checkpoint apart when a peer dies, and a corrupt newest file
falls back to the one before it. Files hold only tensors and plain values and are read with
``torch.load(weights_only=True)``.

A fresh run never replaces an earlier run's checkpoints silently: :func:`check_fresh_start`
refuses a folder that holds some unless ``--resume`` (continue) or ``--overwrite`` (start over),
in the Python API ``resume=True`` or ``overwrite=True``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmaccel.runtime.checkpoint_io import (
    load_verified,
    newest_valid,
    save_verified,
    settings_diff,
    verify,
    write_error,
)

__all__ = [
    "KINDS", "available_steps", "check_fresh_start", "clear", "clear_all", "load_iteration", "load_step", "newest_loadable_step",
    "restore_scheduler", "save_iteration", "save_step", "scheduler_state",
]  # fmt: skip

_KEEP = 3
_PLAIN = (Tensor, int, float, bool, str, type(None))
KINDS = {"clip": ("clip", "step"), "pipeline": ("pipe", "iter")}  # mode -> file prefix, unit


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a full disk or a refused folder: one line naming it
        raise write_error(err, directory) from None


def _name(rank: int, world_size: int, step: int, kind: str = "clip") -> str:
    prefix, unit = KINDS[kind]
    return f"{prefix}{rank}of{world_size}_{unit}{step:05d}.pt"


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


def restore_scheduler(scheduler: Any, state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put ``state`` (from :func:`scheduler_state`) back into ``scheduler``.

    With ``device``, a tensor goes where the scheduler's current attribute of that name lives (a
    freshly ``set_timesteps`` scheduler: e.g. UniPC keeps ``sigmas`` on the CPU), and tensors
    the scheduler does not hold yet (its history of model outputs) go to ``device``.
    """
    def place(value: Any, where: torch.device | None) -> Any:
        if isinstance(value, Tensor):
            return value.to(where or device)
        if isinstance(value, (list, tuple)):
            return type(value)(place(v, where) for v in value)
        return value

    for key, value in state.items():
        if device is not None:
            current = getattr(scheduler, key, None)
            value = place(value, current.device if isinstance(current, Tensor) else None)
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
    _make_dir(directory)
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


def available_steps(directory: Path, rank: int, world_size: int, kind: str = "clip") -> list[int]:
    """Steps (clip mode) or iterations (pipeline mode) this rank has a checkpoint for, ascending."""
    prefix, unit = KINDS[kind]
    pattern = re.compile(rf"{prefix}{rank}of{world_size}_{unit}(\d+)\.pt")
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.fullmatch(p.name)))


def newest_loadable_step(
    directory: Path, rank: int, world_size: int, warn: Callable[[str], None], kind: str = "clip"
) -> int:
    """This rank's newest step (or iteration) whose checkpoint is intact (0: none); each corrupt
    newer one is reported through ``warn`` in one line and skipped."""
    paths = {
        directory / _name(rank, world_size, s, kind): s for s in available_steps(directory, rank, world_size, kind)
    }
    found = newest_valid(list(paths), load=verify, warn=warn)
    return 0 if found is None else paths[found[0]]


def load_step(
    directory: Path, rank: int, world_size: int, step: int, meta: dict[str, Any]
) -> tuple[Tensor, dict[str, Any]]:
    """This rank's latents and scheduler state after ``step``; ``ValueError`` naming the settings
    that differ if another run wrote it."""
    payload = _load_matching(directory, rank, world_size, step, meta, "clip")
    return payload["latents"], payload["scheduler"]


def _load_matching(
    directory: Path, rank: int, world_size: int, index: int, meta: dict[str, Any], kind: str
) -> dict[str, Any]:
    path = directory / _name(rank, world_size, index, kind)
    if not path.is_file():
        raise FileNotFoundError(f"rank {rank}: no checkpoint for {KINDS[kind][1]} {index} in {directory}")
    payload = load_verified(path)
    if payload["meta"] != meta:
        changed = "; ".join(settings_diff(payload["meta"], meta))
        raise ValueError(
            f"{path} was written by a run with other settings ({changed}); "
            "rerun with the same settings or without --resume"
        )
    return payload


def save_iteration(
    directory: Path, rank: int, world_size: int, iteration: int, state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Pipeline mode: write this rank's driver ``state`` after ``iteration`` iterations atomically
    and drop its pipeline checkpoints older than the last three."""
    _make_dir(directory)
    path = directory / _name(rank, world_size, iteration, "pipeline")
    save_verified({"meta": meta, "iteration": iteration, "state": state}, path)
    for old in available_steps(directory, rank, world_size, "pipeline")[:-_KEEP]:
        (directory / _name(rank, world_size, old, "pipeline")).unlink(missing_ok=True)
    return path


def load_iteration(
    directory: Path, rank: int, world_size: int, iteration: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """Pipeline mode: this rank's driver state after ``iteration`` iterations; ``ValueError``
    naming the settings that differ if another run wrote it."""
    return _load_matching(directory, rank, world_size, iteration, meta, "pipeline")["state"]


_ANY = re.compile(r"(clip|pipe)(\d+)of(\d+)_(step|iter)(\d+)\.pt")


def check_fresh_start(
    directory: Path, *, flag: str = "checkpoint_dir", resume: str = "--resume", overwrite: str = "--overwrite"
) -> None:
    """``ValueError`` when ``directory`` holds checkpoints of an earlier run (any mode, any rank
    count): a fresh run would replace its finished steps. The message names ``resume`` and
    ``overwrite`` (the CLI's flags, or the Python API's ``resume=True`` / ``overwrite=True``)
    and how far the earlier run got."""
    if not directory.is_dir():
        return
    found = [m for p in directory.iterdir() if (m := _ANY.fullmatch(p.name))]
    if not found:
        return
    newest = max(found, key=lambda m: int(m.group(5)))
    unit = newest.group(4) if newest.group(4) == "step" else "iteration"
    raise ValueError(
        f"{flag} {str(directory)!r} holds {len(found)} checkpoint(s) of an earlier run (up to {unit} "
        f"{int(newest.group(5))} on {newest.group(3)} rank(s)); continue it with {resume}, or start over "
        f"with {overwrite} (deletes them)"
    )


def clear_all(directory: Path) -> int:
    """Delete every checkpoint in ``directory`` (any mode, rank or rank count): ``--overwrite``,
    run by rank 0 before the group forms. Returns how many files were deleted."""
    if not directory.is_dir():
        return 0
    found = [p for p in directory.iterdir() if _ANY.fullmatch(p.name)]
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def clear(directory: Path, rank: int, world_size: int, kind: str = "clip") -> None:
    """Delete this rank's checkpoints of one mode (a fresh, non-resumed run)."""
    for step in available_steps(directory, rank, world_size, kind):
        (directory / _name(rank, world_size, step, kind)).unlink(missing_ok=True)
