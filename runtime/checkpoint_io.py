"""Checkpoint files that are written atomically, carry a checksum and say what differs.

:func:`save_verified` writes ``torch.save(obj)`` behind a 48-byte header (magic, SHA-256 of the
payload, payload length) to a temp file in the same folder, fsyncs it and renames it into place,
so a reader sees either the old file or the complete new one. :func:`load_verified` checks the
header before unpickling (``weights_only=True``): a truncated or altered file is a one-line
:class:`CorruptCheckpointError` naming the file and what is wrong. :func:`newest_valid` walks
checkpoints newest first and falls back to the previous good one; :func:`settings_diff` names
the settings that differ between a checkpoint and the current run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptCheckpointError",
    "load_verified",
    "newest_valid",
    "save_verified",
    "settings_diff",
    "verify",
]

_MAGIC = b"MMACKPT1"
_HEADER = struct.Struct(">8s32sQ")  # magic, sha256 digest, payload length


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated, altered or not written by :func:`save_verified`."""


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes and counts what goes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.length = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.sha.update(view)
        self.length += len(view)
        return len(view)


def save_verified(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, behind a checksum header; returns the path."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * _HEADER.size)
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.seek(0)
            f.write(_HEADER.pack(_MAGIC, writer.sha.digest(), writer.length))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def verify(path: str | os.PathLike[str]) -> bytes:
    """The payload of ``path`` after checking its header, length and checksum.

    ``FileNotFoundError`` when it is missing; :class:`CorruptCheckpointError` (one line, naming
    the file) when it is truncated, altered or has no header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is truncated ({len(data)} bytes, no header)")
    magic, digest, length = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} has no mmaccel checksum header")
    payload = memoryview(data)[_HEADER.size :]
    if len(payload) != length:
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} is truncated ({len(payload)} of {length} payload bytes)"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is corrupt (checksum mismatch)")
    return bytes(payload)


def load_verified(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """The object :func:`save_verified` wrote to ``path``, checked first (see :func:`verify`);
    unpickled with ``weights_only=True`` (tensors and plain values only)."""
    import torch

    payload = verify(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:  # an intact file holding something torch refuses (e.g. a pickled class)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} cannot be loaded safely: {first[:200]}") from None


def newest_valid(
    paths: Iterable[str | os.PathLike[str]],
    load: Callable[[Path], Any] = load_verified,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, Any] | None:
    """The newest of ``paths`` (given oldest first) that loads, with its content; ``None`` if none.

    Each corrupt one skipped is reported through ``warn`` in one line (``"skipping ...: reason;
    falling back to ..."``).
    """
    ordered = [Path(p) for p in paths][::-1]
    for i, path in enumerate(ordered):
        try:
            return path, load(path)
        except CorruptCheckpointError as err:
            if warn is not None:
                after = f"falling back to {ordered[i + 1].name}" if i + 1 < len(ordered) else "no older checkpoint"
                warn(f"{err}; {after}")
    return None


def _flatten(value: Any, prefix: str = "", parent: str = "") -> dict[str, Any]:
    """Leaves of nested mappings as ``{"a.b": leaf}``; a JSON-encoded mapping is opened in place
    (its keys are not prefixed with the key holding the string, unless that would be empty)."""
    if isinstance(value, str) and value[:1] == "{":
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = None
        if isinstance(decoded, Mapping):
            return _flatten(decoded, parent, parent)
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key), prefix))
        return out
    return {prefix: value}


def settings_diff(saved: Mapping[str, Any], current: Mapping[str, Any], *, width: int = 40) -> list[str]:
    """Human lines for the settings that differ: ``"prompt: 'a cat' -> 'a dog'"``.

    Nested mappings are compared key by key (``clip.padding``) and a JSON-encoded mapping (as in a
    fingerprint ``{"settings": json.dumps(...)}``) is opened in place, so the message names
    ``prompt`` rather than ``settings``.
    """
    old, new = _flatten(saved), _flatten(current)

    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= width else text[: width - 3] + "..."

    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            before = "(absent)" if a is missing else short(a)
            after = "(absent)" if b is missing else short(b)
            lines.append(f"{key}: {before} -> {after}")
    return lines
