"""The contract every technique follows, as one check (docs/architecture.md, "The contract").

``XConfig`` is a frozen, validated dataclass whose defaults construct; ``apply_x(model,
config=None, ...)`` returns an ``XHandle`` (a :class:`~mmaccel.runtime.patching.PatchHandle`
subclass) that is a context manager, refuses a second application, carries ``.stats`` with
``reset()`` and ``summary() -> dict`` of plain numbers, and whose ``remove()`` restores the model
bit-for-bit: parameters, buffers, every module's instance attributes (names and values, so
an attribute diffusers added during the patched run, such as the ``_diffusers_hook`` registry a
pipeline's ``cache_context`` creates, fails it) and the output of a rerun.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.pipelines import pipeline_transformers
from mmaccel.runtime.stats import Stats, check_summary

__all__ = ["check_technique_contract"]

_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")


def _snapshot(target: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, int]]]:
    """Parameters, buffers and module attributes of ``target``: a module, or every transformer of a
    pipeline (``transformer``, ``transformer_2``) and the pipeline's own attributes."""
    models = {"": target} if isinstance(target, torch.nn.Module) else pipeline_transformers(target)
    state = {f"{name}:{k}": v.detach().clone() for name, model in models.items()
             for k, v in model.state_dict(keep_vars=True).items()}  # fmt: skip
    modules = [m for model in models.values() for m in model.modules()]
    attrs = [{k: id(v) for k, v in m.__dict__.items() if k not in _MODULE_SLOTS} for m in modules]
    if not isinstance(target, torch.nn.Module):
        attrs.append({k: id(v) for k, v in target.__dict__.items()})
    return state, attrs


def _assert_same_outputs(a: Any, b: Any, what: str) -> None:
    left, right = pytree.tree_leaves(a), pytree.tree_leaves(b)
    tensors = [(x, y) for x, y in zip(left, right) if isinstance(x, torch.Tensor)]
    if len(left) != len(right) or not tensors:
        raise AssertionError(f"{what}: outputs differ in structure or hold no tensor")
    for x, y in tensors:
        if x.shape != y.shape or not torch.equal(x, y):
            raise AssertionError(f"{what}: outputs differ after remove() (not bit-exact)")


def check_technique_contract(
    config_cls: type,
    apply: Callable[..., PatchHandle],
    handle_cls: type[PatchHandle],
    model: Any,
    run: Callable[[], Any],
    target: Any = None,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Check one technique against the contract; returns the summary of the patched run.

    ``model`` is what ``run()`` calls (e.g. a pipeline's transformer, or a VLM), ``target`` the
    module ``apply`` patches (default ``model``), or a pipeline whose transformers it patches
    (Wan 2.2: ``transformer`` and ``transformer_2``). ``run`` must be deterministic (seed inside it).
    """
    target = model if target is None else target
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise AssertionError(f"{config_cls.__name__} must be a frozen dataclass")
    config = config_cls()
    first = dataclasses.fields(config_cls)[0].name
    try:
        setattr(config, first, getattr(config, first))
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError(f"{config_cls.__name__}.{first} can be assigned: the config is not frozen")
    if not issubclass(handle_cls, PatchHandle):
        raise AssertionError(f"{handle_cls.__name__} must subclass PatchHandle")

    reference = run()  # first run: lazily created caches exist before the snapshot
    state, attrs = _snapshot(target)
    handle = apply(target, None, **apply_kwargs)
    if type(handle) is not handle_cls:
        raise AssertionError(f"apply returned {type(handle).__name__}, expected {handle_cls.__name__}")
    with handle as entered:
        if entered is not handle:
            raise AssertionError("the handle's __enter__ must return the handle")
        try:
            apply(target, None, **apply_kwargs)
        except ValueError:
            pass
        else:
            raise AssertionError("a second apply on the same model must raise ValueError")
        # as a diffusers pipeline calls it: inside the transformer's cache context, which creates a
        # hook registry on the model on first use (remove() must take it away again)
        cache_context = getattr(target, "cache_context", None)
        if callable(cache_context):
            with cache_context("mmaccel-contract"):
                run()
        else:
            run()
        if not isinstance(handle.stats, Stats):
            raise AssertionError(f"handle.stats must be a mmaccel.runtime.stats.Stats, got {type(handle.stats).__name__}")
        summary = check_summary(handle.stats.summary())
        if not summary:
            raise AssertionError("stats.summary() is empty after a patched run")
        handle.stats.reset()
        check_summary(handle.stats.summary())
    if handle.active:
        raise AssertionError("leaving the with-block must remove the handle")
    after_state, after_attrs = _snapshot(target)
    if after_state.keys() != state.keys() or any(not torch.equal(state[k], after_state[k]) for k in state):
        raise AssertionError("remove() changed the parameters or buffers")
    if after_attrs != attrs:
        changed = [
            f"module {i}: {sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b[k])}"
            for i, (a, b) in enumerate(zip(attrs, after_attrs)) if a != b
        ]  # fmt: skip
        raise AssertionError(f"remove() left instance attributes changed ({'; '.join(changed[:5])})")
    _assert_same_outputs(reference, run(), "dense run before apply vs after remove")
    return summary
