"""Video files: the output format checked before any work, the written file checked after.

:func:`check_video_output` runs before a model loads: the suffix must name a format an installed
writer produces (MP4 through imageio's ffmpeg, GIF through PIL, PNG frames through PIL), else one
line lists the formats. :func:`write_video` writes atomically (temp file + rename) and then reads
the result back, so "wrote" is printed only for a non-empty file that holds every frame.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmaccel.runtime.checkpoint_io import WriteError
from mmaccel.runtime.paths import check_output_path

__all__ = ["VIDEO_FORMATS", "check_video_output", "frame_paths", "write_video"]

#: Output suffix -> what is written.
VIDEO_FORMATS = {
    ".mp4": "H.264 through imageio-ffmpeg",
    ".gif": "animated GIF",
    ".png": "PNG frames NAME_00000.png, NAME_00001.png, ...",
}


def _formats() -> str:
    return ", ".join(f"{suffix} ({what})" for suffix, what in VIDEO_FORMATS.items())


def _ffmpeg() -> str:
    """The ffmpeg binary imageio writes MP4 with; ``ValueError`` saying how to get it."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise ValueError(
            f"writing MP4 needs imageio and imageio-ffmpeg ({err}); pip install imageio imageio-ffmpeg, "
            "or write .gif or .png frames"
        ) from None


def check_video_output(path: Any, *, flag: str = "--out") -> Path:
    """``path`` if its format can be written here and its folder is writable; nothing is created.

    ``ValueError`` naming ``flag`` and listing the formats for any other suffix; ``ValueError``
    for MP4 without ffmpeg; the checks of :func:`mmaccel.runtime.paths.check_output_path`.
    """
    out = check_output_path(path, flag=flag)
    suffix = out.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        given = f"'{suffix}'" if suffix else "no suffix"
        raise ValueError(f"{flag} {str(out)!r} has {given}; the formats written are {_formats()}")
    if suffix == ".mp4":
        _ffmpeg()
    return out


def frame_paths(path: str | Path, count: int) -> list[Path]:
    """The files ``.png`` output writes for ``count`` frames: ``NAME_00000.png`` ..."""
    path = Path(path)
    return [path.with_name(f"{path.stem}_{i:05d}.png") for i in range(count)]


def _uint8(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def _write_one(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename ``tmp`` onto ``path``; the temp file never outlives a failure."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _verify(path: Path, frames: int) -> None:
    """:class:`WriteError` unless ``path`` is non-empty and reads back with ``frames`` frames."""
    from PIL import Image

    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        raise WriteError(errno.EIO, f"{str(path)!r} was written empty; nothing usable was saved")
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        import imageio_ffmpeg

        found, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    else:
        with Image.open(path) as img:
            found = getattr(img, "n_frames", 1)
            img.seek(found - 1)
            img.load()
    # PIL merges identical consecutive GIF frames (adding up their durations): fewer is fine there
    if found != frames and not (suffix == ".gif" and 1 <= found < frames):
        raise WriteError(errno.EIO, f"{str(path)!r} holds {found} frames after writing, expected {frames}")


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Write ``frames`` ``(F, H, W, 3)`` float in [0, 1] to ``path`` (``.mp4``, ``.gif`` or
    ``.png`` frames) atomically, then read it back; returns the path (the first frame's for PNG).

    :class:`~mmaccel.runtime.checkpoint_io.WriteError` (one line) when the file does not read back
    non-empty with every frame.
    """
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ValueError(f"cannot write {str(path)!r}; the formats written are {_formats()}")
    data = _uint8(np.asarray(frames))
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        files = frame_paths(path, len(data))
        for frame, file in zip(data, files):
            _write_one(file, lambda tmp, f=frame: Image.fromarray(f).save(tmp, format="PNG"))
            _verify(file, 1)
        return files[0]
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in data]
        duration = max(1, round(1000 / fps))

        def write(tmp: Path) -> None:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        _ffmpeg()

        def write(tmp: Path) -> None:
            import imageio

            with imageio.get_writer(str(tmp), format="FFMPEG", fps=fps, quality=5.0, macro_block_size=16) as w:
                for frame in data:
                    w.append_data(frame)

    _write_one(path, write)
    _verify(path, len(data))
    return path
