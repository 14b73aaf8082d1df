"""Checkpoint files that are written atomically, carry a checksum and say what differs.

:func:`save_verified` writes ``torch.save(obj)`` behind a 48-byte header (magic, SHA-256 of the
payload, payload length) to a temp file in the same folder, fsyncs it and renames it into place,
so a reader sees either the old file or the complete new one. :func:`load_verified` checks the
header before unpickling (``weights_only=True``): a truncated or altered file is a one-line
:class:`CorruptCheckpointError` naming the file and what is wrong. :func:`newest_valid` walks
checkpoints newest first and falls back to the previous good one; :func:`settings_diff` names
the settings that differ between a checkpoint and the current run.

A full disk or a refused write is a one-line :class:`WriteError` naming the file, the space it
needs and the space free (:func:`write_error`). :func:`check_weight_files` checks a model folder's
weight files before anything loads: a truncated or garbled ``.safetensors`` header, a missing
shard or a pickle file (``.bin``, ``.pt``: unpickling runs code) is a one-line
:class:`CorruptCheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptCheckpointError",
    "WriteError",
    "check_weight_files",
    "load_verified",
    "newest_valid",
    "save_verified",
    "settings_diff",
    "verify",
    "write_error",
]

_MAGIC = b"MMACKPT1"
_HEADER = struct.Struct(">8s32sQ")  # magic, sha256 digest, payload length


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated, altered or not written by :func:`save_verified`."""


class WriteError(OSError, ValueError):
    """A file could not be written (disk full, no permission, read-only); one line naming the
    file and, for a full disk, the space needed and free. Also a ``ValueError``, so the CLI and
    the ranks of a ``torchrun`` report it as one line (exit 2) like every user error."""


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts / lists / tuples)."""
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    nbytes = getattr(obj, "nbytes", None)
    return int(nbytes) if isinstance(nbytes, int) else 0


def write_error(err: OSError, path: str | os.PathLike[str], needed: int | None = None) -> OSError:
    """``err`` as one line naming ``path`` (a :class:`WriteError` for a full disk or a refused
    write, with ``needed`` bytes and the free space); other errors come back unchanged."""
    from mmaccel.runtime.limits import format_bytes

    path = Path(path)
    if err.errno in _DISK_ERRNOS:
        try:
            free = format_bytes(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "unknown"
        need = f"needs about {format_bytes(needed)}" if needed else "needs more space"
        return WriteError(err.errno, f"no space left to write {str(path)!r}: it {need}, {free} is free on its disk; "
                          "free some space or choose another folder")  # fmt: skip
    if err.errno in _PERMISSION_ERRNOS:
        return WriteError(err.errno, f"cannot write {str(path)!r}: {err.strerror or 'permission denied'}")
    return err


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
    except OSError as err:
        raise write_error(err, path, _HEADER.size + _tensor_bytes(obj)) from None
    except RuntimeError as err:  # torch.save wraps the file's OSError ("unexpected pos ...")
        cause = _os_cause(err)
        if cause is None:
            raise
        raise write_error(cause, path, _HEADER.size + _tensor_bytes(obj)) from None
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


def _os_cause(err: BaseException) -> OSError | None:
    """The ``OSError`` somewhere in ``err``'s cause / context chain, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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


# ------------------------------------------------------------------------------------------
# Model folders
# ------------------------------------------------------------------------------------------

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own cap on the JSON header


def _check_safetensors(path: Path) -> None:
    """Header of a ``.safetensors`` file: length, JSON, dtypes and offsets within the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"weight file {str(path)!r} is truncated ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise CorruptCheckpointError(
                f"weight file {str(path)!r} is not a safetensors file or is truncated "
                f"(header of {length:,} bytes in a {size:,}-byte file)"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise CorruptCheckpointError(f"weight file {str(path)!r} has a garbled safetensors header") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"weight file {str(path)!r} has a garbled safetensors header")
    data = size - 8 - length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CorruptCheckpointError(f"weight file {str(path)!r} has a garbled entry for {name!r}")
        end = max(end, offsets[1])
    if end > data:
        raise CorruptCheckpointError(
            f"weight file {str(path)!r} is truncated ({data:,} of {end:,} data bytes)"
        )


def check_weight_files(folder: str | os.PathLike[str], *, flag: str = "model") -> None:
    """Check every weight file under ``folder`` before a loader opens it (nothing is loaded).

    :class:`CorruptCheckpointError` (one line, naming ``flag`` and the file) for a truncated or
    garbled ``.safetensors`` header, a shard an ``*.index.json`` names that is missing, or a
    pickle weight file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``) in a folder without
    ``.safetensors`` (the loaders would unpickle it, which runs code; next to safetensors files,
    which the loaders prefer, a pickle is left alone).
    """
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        try:
            if suffix == ".safetensors":
                _check_safetensors(path)
            elif suffix in _PICKLE_SUFFIXES and not any(path.parent.glob("*.safetensors")):
                raise CorruptCheckpointError(
                    f"weight file {str(path)!r} is a pickle, which can run code when loaded; "
                    "save the model with safetensors (save_pretrained's default) and remove it"
                )
            elif path.name.endswith(".index.json"):
                index = json.loads(path.read_text(encoding="utf-8"))
                shards = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else set()
                missing = sorted(s for s in shards if not (path.parent / s).is_file())
                if missing:
                    raise CorruptCheckpointError(f"{str(path)!r} names missing weight shards: {', '.join(missing[:3])}")
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(f"{flag}: {err}") from None
        except (OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{flag}: cannot read {str(path)!r}: {err}") from None
