"""Paths checked before any work: output files and folders, model folders, bounded output folders.

:func:`check_output_path` / :func:`check_output_dir` fail in milliseconds on an output that
could never be written (a directory where a file is wanted, a read-only folder), so a long
generation is not thrown away at the very end. :func:`check_model_folder` reads the class a
``save_pretrained`` folder declares (``model_index.json`` / ``config.json``) without loading it.
:func:`prune_folder` keeps a folder of generated files under a count and a byte cap.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "check_model_folder",
    "check_output_dir",
    "check_output_path",
    "model_folder_class",
    "prune_folder",
    "read_json_object",
]


def _as_path(path: Any, flag: str) -> Path:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{flag} must be a path, got {type(path).__name__}")
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; give a file path")
    if "\x00" in str(path):
        raise ValueError(f"{flag} contains a NUL character")
    return Path(path).expanduser()


def _nearest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def _check_writable_dir(folder: Path, flag: str, target: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"{flag} {str(target)!r}: {str(folder)!r} is not a folder")
    try:  # os.access says yes to root on read-only mounts; a real probe file does not lie
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mmaccel-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{flag} {str(target)!r}: cannot write in {str(folder)!r} ({reason})") from None


def check_output_path(path: Any, *, flag: str = "--out", suffixes: Iterable[str] | None = None) -> Path:
    """The output file ``path``, checked to be writable; nothing is created.

    Refused (``ValueError`` naming ``flag``): an empty path, an existing directory, an existing
    file that cannot be replaced, a path whose nearest existing parent is not a writable folder
    (missing parents are created later by the writer), a suffix outside ``suffixes``.
    """
    out = _as_path(path, flag)
    if suffixes is not None:
        allowed = tuple(s.lower() for s in suffixes)
        if out.suffix.lower() not in allowed:
            raise ValueError(f"{flag} {str(out)!r} must end with {' or '.join(allowed)}")
    if out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is a directory; give a file path such as {str(out / 'video.mp4')!r}")
    if out.exists() and not out.is_file():
        raise ValueError(f"{flag} {str(out)!r} exists and is not a regular file")
    # the writer replaces the file atomically from a temp file in the same folder: that folder
    # (or its nearest existing ancestor, when the writer creates it) must be writable
    _check_writable_dir(_nearest_existing(out.parent), flag, out)
    return out


def check_output_dir(path: Any, *, flag: str = "--checkpoint-dir") -> Path:
    """The output folder ``path``: an existing writable folder, or creatable under a writable one."""
    out = _as_path(path, flag)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} exists and is not a folder")
    _check_writable_dir(_nearest_existing(out), flag, out)
    return out


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path``; ``ValueError`` naming the file when it is unreadable
    or holds something else than an object (a model folder's ``config.json``, ``model_index.json``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return data


def model_folder_class(folder: Any) -> str | None:
    """The class a ``save_pretrained`` folder declares: ``model_index.json``'s ``_class_name``
    (diffusers pipelines), else ``config.json``'s first ``architectures`` entry or its
    ``_class_name``; ``None`` when the folder declares none. Nothing is loaded."""
    folder = Path(folder)
    for name, keys in (("model_index.json", ("_class_name",)), ("config.json", ("architectures", "_class_name"))):
        path = folder / name
        if not path.is_file():
            continue
        data = read_json_object(path)
        for key in keys:
            value = data.get(key)
            if isinstance(value, list) and value and isinstance(value[0], str):
                return value[0]
            if isinstance(value, str) and value:
                return value
    return None


def check_model_folder(folder: Any, *, flag: str, accepted: Iterable[str]) -> Path:
    """``folder`` if it is a folder declaring one of the ``accepted`` classes.

    ``FileNotFoundError`` for a missing folder, ``ValueError`` naming ``flag``, the class found and
    the accepted ones otherwise.
    """
    path = _as_path(folder, flag)
    accepted = tuple(accepted)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {str(path)!r} is not a folder")
    found = model_folder_class(path)
    if found is None:
        raise ValueError(
            f"{flag} {str(path)!r} holds no model_index.json or config.json naming a class; "
            f"expected a folder saved with save_pretrained ({', '.join(accepted)})"
        )
    if found not in accepted:
        raise ValueError(f"{flag} {str(path)!r} holds a {found}; expected one of {', '.join(accepted)}")
    return path


def prune_folder(
    folder: Any,
    *,
    max_files: int,
    max_bytes: int,
    min_age_s: float = 0.0,
    pattern: str = "*",
    now: float | None = None,
) -> list[Path]:
    """Delete the oldest files matching ``pattern`` under ``folder`` (recursively) until at most
    ``max_files`` of them and ``max_bytes`` bytes are left; files younger than ``min_age_s``
    seconds are never deleted (they may be in use). Other files are never touched; empty
    sub-folders left behind are removed. Returns the deleted files."""
    for name, value in (("max_files", max_files), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    root = Path(folder)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    entries = []
    for path in root.rglob(pattern):
        try:
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                entries.append((st.st_mtime, path, st.st_size))
        except OSError:  # deleted meanwhile by another request
            continue
    entries.sort(key=lambda e: (e[0], str(e[1])))
    count, total = len(entries), sum(e[2] for e in entries)
    deleted = []
    for mtime, path, size in entries:
        if count <= max_files and total <= max_bytes:
            break
        if now - mtime < min_age_s:
            break  # sorted by age: every later file is younger
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        count, total = count - 1, total - size
        deleted.append(path)
    for parent in sorted({p.parent for p in deleted}, key=lambda p: len(p.parts), reverse=True):
        while parent != root and parent.is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    return deleted
