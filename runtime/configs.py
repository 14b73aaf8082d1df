"""The ``config=None`` half of the technique contract: ``apply_x(model, config=None)``."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["resolve_config"]

C = TypeVar("C")


def resolve_config(config: C | None, cls: type[C]) -> C:
    """``cls()`` (the reference defaults) for None, ``config`` itself if it is a ``cls``;
    ``TypeError`` naming the expected class otherwise."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__} or None, got {type(config).__name__}")
    return config
