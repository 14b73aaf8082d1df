"""The statistics every technique handle carries: ``handle.stats.reset()`` and ``.summary()``."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod

__all__ = ["Stats", "check_summary"]


class Stats(ABC):
    """Base of every technique's statistics.

    ``summary()`` returns a flat dict of plain Python numbers (int, float, bool) or None where
    nothing was recorded yet; ``reset()`` forgets what was recorded.
    """

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def summary(self) -> dict[str, int | float | bool | None]: ...


def check_summary(summary: object) -> dict[str, int | float | bool | None]:
    """``TypeError`` unless ``summary`` is a flat ``str -> plain number or None`` dict."""
    if not isinstance(summary, dict):
        raise TypeError(f"summary() must return a dict, got {type(summary).__name__}")
    for key, value in summary.items():
        if not isinstance(key, str):
            raise TypeError(f"summary() key {key!r} is not a str")
        plain = value is None or (isinstance(value, numbers.Real) and type(value).__module__ == "builtins")
        if not plain:
            raise TypeError(f"summary()[{key!r}] = {value!r} ({type(value).__name__}) is not a plain number")
    return summary
