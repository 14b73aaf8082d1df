"""The ``config=None`` half of the technique contract (``apply_x(model, config=None)``) and the
field checks configs share."""

from __future__ import annotations

import math
from typing import TypeVar

__all__ = ["check_floats", "check_ints", "resolve_config"]

C = TypeVar("C")


def resolve_config(config: C | None, cls: type[C]) -> C:
    """``cls()`` (the reference defaults) for None, ``config`` itself if it is a ``cls``;
    ``TypeError`` naming the expected class otherwise."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__} or None, got {type(config).__name__}")
    return config


def check_ints(config: object, names: tuple[str, ...], minimum: int) -> None:
    """``ValueError`` naming the first field of ``names`` that is not an int >= ``minimum``
    (bools are refused: ``True`` is not a step count)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_floats(config: object, names: tuple[str, ...], *, positive: bool) -> None:
    """``ValueError`` naming the first field of ``names`` that is not a finite number > 0
    (``positive``) or >= 0; bools are refused."""
    for name in names:
        value = getattr(config, name)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isinf(value)
        if not ok or not (value > 0 if positive else value >= 0):
            raise ValueError(f"{name} must be a finite float {'>' if positive else '>='} 0, got {value!r}")
