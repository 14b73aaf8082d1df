"""Gradient checkpointing of a patched transformer: a refusal where a recompute cannot take its
forward's decisions.

diffusers checkpoints a transformer's blocks when ``enable_gradient_checkpointing()`` was called
and gradients are enabled: backward recomputes each block. A technique that decides per forward
(SVG2's k-means clustering, token density's reduction plan) and does not keep that decision for
the recompute would recompute other tensors: torch's ``CheckpointError`` at best, a wrong
gradient at worst. Such a technique calls :func:`refuse_checkpointed_gradients` at apply time, and
the forward that would be recomputed raises ``NotImplementedError`` before any backward runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmaccel.runtime.patching import PatchHandle

__all__ = ["checkpointing_with_gradients", "refuse_checkpointed_gradients"]


def checkpointing_with_gradients(transformer: torch.nn.Module) -> bool:
    """Whether a forward now would checkpoint ``transformer``'s blocks (diffusers' own test:
    ``torch.is_grad_enabled() and self.gradient_checkpointing``)."""
    return torch.is_grad_enabled() and bool(getattr(transformer, "gradient_checkpointing", False))


def refuse_checkpointed_gradients(
    handle: PatchHandle,
    transformer: torch.nn.Module,
    technique: str,
    reason: str,
    decided: Callable[[], bool] | None = None,
) -> None:
    """Make a forward of ``transformer`` with gradient checkpointing and gradients enabled raise
    ``NotImplementedError`` naming ``technique`` and ``reason``.

    ``decided=None``: refused before the forward (every forward takes decisions). Otherwise
    ``decided()`` is asked after the forward, before its output is returned, whether that forward
    took a decision a recompute could not repeat (e.g. a reduced plan; a dense one recomputes
    exactly): only then is it refused, so no backward ever runs through it. The hook goes with
    ``handle.remove()``.
    """

    def refuse() -> None:
        raise NotImplementedError(
            f"{technique} under gradient checkpointing with gradients enabled is not implemented: {reason}. "
            "Call transformer.disable_gradient_checkpointing(), or run under torch.no_grad()"
        )

    if decided is None:

        def before(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if checkpointing_with_gradients(module):
                refuse()

        handle.add_torch_hook(transformer.register_forward_pre_hook(before))
        return

    def after(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if checkpointing_with_gradients(module) and decided():
            refuse()

    handle.add_torch_hook(transformer.register_forward_hook(after))
