"""Pipelines that hold several transformers: one technique, every transformer, one handle.

Wan 2.2 A14B pipelines (``WanPipeline``, ``WanImageToVideoPipeline``) run two experts: the
high-noise ``transformer`` for timesteps ``>= boundary_ratio * num_train_timesteps`` and the
low-noise ``transformer_2`` below. Every ``apply_x`` that takes a transformer also takes such a
pipeline: :func:`apply_to_pipeline` applies the technique to each transformer the pipeline holds
and returns one handle of the technique's own class whose ``remove()`` undoes them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats

__all__ = [
    "TRANSFORMER_ATTRS",
    "PipelineStats",
    "apply_to_pipeline",
    "boundary_timestep",
    "expert_for",
    "is_pipeline",
    "pipeline_transformers",
    "timestep_callback",
]

#: the pipeline attributes that may hold a denoising transformer, in denoising order
TRANSFORMER_ATTRS = ("transformer", "transformer_2")


def is_pipeline(obj: object) -> bool:
    """Whether ``obj`` is a pipeline (not a module) holding a transformer under `TRANSFORMER_ATTRS`."""
    if isinstance(obj, torch.nn.Module):
        return False
    return any(isinstance(getattr(obj, attr, None), torch.nn.Module) for attr in TRANSFORMER_ATTRS)


def pipeline_transformers(pipe: Any) -> dict[str, torch.nn.Module]:
    """``{attribute: transformer}`` for every transformer ``pipe`` holds (``transformer``,
    ``transformer_2``), in denoising order; ``ValueError`` if it holds none or one module twice."""
    found = {attr: getattr(pipe, attr, None) for attr in TRANSFORMER_ATTRS}
    found = {attr: module for attr, module in found.items() if isinstance(module, torch.nn.Module)}
    if not found:
        raise ValueError(f"{type(pipe).__name__} holds no transformer under {TRANSFORMER_ATTRS}")
    if len({id(m) for m in found.values()}) != len(found):
        raise ValueError(f"{type(pipe).__name__}.transformer and .transformer_2 are the same module")
    return found


def boundary_timestep(pipe: Any) -> float | None:
    """The timestep where a two-expert pipeline switches from ``transformer`` to ``transformer_2``
    (``boundary_ratio * scheduler.config.num_train_timesteps``, as diffusers' ``WanPipeline``), or
    None for a one-transformer pipeline."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None or getattr(pipe, "transformer_2", None) is None:
        return None
    return float(ratio) * pipe.scheduler.config.num_train_timesteps


def expert_for(pipe: Any, timestep: float) -> str:
    """Which attribute (``"transformer"`` or ``"transformer_2"``) denoises at ``timestep``:
    ``transformer`` at and above the boundary (or always, without one), ``transformer_2`` below."""
    boundary = boundary_timestep(pipe)
    return "transformer" if boundary is None or timestep >= boundary else "transformer_2"


def timestep_callback(pipe: Any, callback: Callable[[], Any] | None) -> Callable[[], Any]:
    """``callback``, or the pipeline's own ``lambda: pipe.current_timestep`` (the scheduler's
    timestep of the step being computed; Wan 2.2 TI2V gives its transformer per-token timesteps)."""
    return callback if callback is not None else (lambda: pipe.current_timestep)


class PipelineStats(Stats):
    """The stats of a technique applied to a pipeline: ``experts[attr]`` is each transformer's
    own stats; ``summary()`` is the one transformer's summary, or with several transformers every
    key prefixed by its attribute (``"transformer/calls"``, ``"transformer_2/calls"``)."""

    def __init__(self, experts: dict[str, Stats]) -> None:
        self.experts = experts

    def reset(self) -> None:
        for stats in self.experts.values():
            stats.reset()

    def summary(self) -> dict[str, int | float | bool | None]:
        if len(self.experts) == 1:
            return next(iter(self.experts.values())).summary()
        return {f"{attr}/{k}": v for attr, stats in self.experts.items() for k, v in stats.summary().items()}


def apply_to_pipeline(
    pipe: Any,
    apply: Callable[..., PatchHandle],
    handle_cls: type[PatchHandle],
    name: str,
    config: Any,
    **kwargs: Any,
) -> PatchHandle:
    """``apply(transformer, config, **kwargs)`` on every transformer of ``pipe``; returns one
    ``handle_cls`` on the pipeline whose ``remove()`` removes each transformer's patches (bit for
    bit, as each handle does), ``experts`` ``{attr: handle}`` and ``stats`` (`PipelineStats`).
    A failure part-way removes what was applied. A second application raises ``ValueError``."""
    transformers = pipeline_transformers(pipe)
    handle = handle_cls(pipe, name)
    experts: dict[str, PatchHandle] = {}
    try:
        for attr, transformer in transformers.items():
            child = apply(transformer, config, **kwargs)
            handle.on_remove(child.remove)
            experts[attr] = child
    except BaseException:
        handle.remove()
        raise
    handle.experts = experts
    handle.stats = PipelineStats({attr: child.stats for attr, child in experts.items()})
    return handle
