"""Opening untrusted images safely: size from the header first, decode only within limits.

:func:`image_size` reads the width and height from the file header (PIL's ``Image.open`` is
lazy: it parses the header and decodes nothing). :func:`open_image` checks that size against a
pixel cap and a minimum side *before* decoding, and turns everything PIL can raise on a hostile
or broken file (its own decompression-bomb guard, truncated data, unknown formats) into a
one-line ``ValueError`` naming the limit and how to raise it.
"""

from __future__ import annotations

import io
import re
import warnings
from os import PathLike
from pathlib import Path

from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "PIL_MAX_PIXELS",
    "ImageSource",
    "check_image_limits",
    "image_size",
    "open_image",
]

#: Default pixel cap (width x height) for images read from users: 16 MP, e.g. 4000 x 4000.
DEFAULT_MAX_PIXELS = 16_000_000
#: Default smallest side in pixels (a 1 x 1 image carries nothing a vision encoder can use).
DEFAULT_MIN_SIDE = 16
#: Largest cap PIL itself lets through: above it ``Image.open`` refuses the file as a bomb.
PIL_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 2**62

ImageSource = str | PathLike | bytes | bytearray


def _label(source: ImageSource, name: str = "image", show_path: bool = True) -> str:
    if not show_path:
        return name
    if isinstance(source, (bytes, bytearray)):
        return f"{name} <{len(source)} bytes>"
    return f"{name} {str(source)!r}"


def _check_limit_args(max_pixels: int, min_side: int) -> None:
    for name, value, low, high in (
        ("max_pixels", max_pixels, 1, PIL_MAX_PIXELS),
        ("min_side", min_side, 1, 65_535),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int in [{low}, {high}], got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    if min_side * min_side > max_pixels:
        raise ValueError(f"max_pixels={max_pixels} is below min_side**2={min_side * min_side}")


def check_image_limits(
    width: int,
    height: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int | None = None,
    what: str = "image",
    flag: str = "max_pixels",
) -> None:
    """``ValueError`` unless ``min(width, height) >= min_side``, ``width * height <= max_pixels``
    and (when given) ``max(width, height) <= max_side``.

    ``flag`` names the setting that raises the cap in the message (``--max-pixels`` on the CLI).
    """
    _check_limit_args(max_pixels, min_side)
    if min(width, height) < min_side:
        raise ValueError(
            f"{what} is {width}x{height}; each side must be at least {min_side} px"
        )
    if max_side is not None and max(width, height) > max_side:
        raise ValueError(f"{what} is {width}x{height}; each side must be at most {max_side} px")
    if width * height > max_pixels:
        raise ValueError(
            f"{what} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} "
            f"({flag}; at most {PIL_MAX_PIXELS:,})"
        )


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(source)))
    if not isinstance(source, (str, PathLike)):
        raise TypeError(f"{name} must be a path or bytes, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        raise ValueError(f"{name} {str(source)!r} is a folder, not an image file")
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO: reading could never end
        raise ValueError(f"{name} {str(source)!r} is not a regular file (a device, pipe or socket)")
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(source)!r} not found")
    return Image.open(path)


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _opened(
    source: ImageSource, max_pixels: int, flag: str = "max_pixels", name: str = "image", show_path: bool = True
) -> Image.Image:
    """``Image.open`` with PIL's bomb guard and parse errors turned into one-line ``ValueError``."""
    try:
        with warnings.catch_warnings():  # our own cap is checked next; PIL's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _open(source, name)
    except Image.DecompressionBombError as err:
        found = _BOMB_PIXELS.search(str(err))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        limit = (
            f"the limit is {max_pixels:,} ({flag}; at most {PIL_MAX_PIXELS:,})"
            if max_pixels < PIL_MAX_PIXELS
            else f"PIL opens at most {PIL_MAX_PIXELS:,}"
        )
        raise ValueError(f"{_label(source, name, show_path)} declares {size}; {limit}") from None
    except (OSError, SyntaxError) as err:  # PIL raises SyntaxError for some corrupt headers
        if isinstance(err, FileNotFoundError):
            raise
        reason = str(err)
        if not show_path and isinstance(source, (str, PathLike)):  # PIL's text names the file: hide it
            reason = reason.replace(repr(str(source)), "the file").replace(str(source), "the file")
        raise ValueError(f"cannot read {_label(source, name, show_path)}: {reason}") from None


def image_size(source: ImageSource) -> tuple[int, int]:
    """``(width, height)`` from the header of the file or bytes ``source``; nothing is decoded.

    Images over :data:`PIL_MAX_PIXELS` (PIL's own bomb guard) are a ``ValueError`` here too.
    """
    with _opened(source, PIL_MAX_PIXELS) as img:
        return img.size


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int | None = None,
    flag: str = "max_pixels",
    name: str = "image",
    show_path: bool = True,
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) as an RGB image, within the limits.

    The size is read from the header and checked with :func:`check_image_limits` before any pixel
    is decoded; ``name`` is how messages call the image (``--image`` on the CLI) and ``flag`` the
    setting that raises the cap; ``show_path=False`` leaves the path out of messages (a server's
    upload folder is none of its users' business). ``FileNotFoundError`` for a missing file, ``ValueError`` (one line) for a file that
    is too large, too small, truncated or not an image, ``TypeError`` for another kind of source.
    """
    _check_limit_args(max_pixels, min_side)
    with _opened(source, max_pixels, flag, name, show_path) as img:
        width, height = img.size
        label = _label(source, name, show_path)
        check_image_limits(
            width, height, max_pixels=max_pixels, min_side=min_side, max_side=max_side, what=label, flag=flag
        )
        try:
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # truncated / corrupt pixel data
            raise ValueError(f"cannot decode {label}: {err}") from None
