"""Reversible, instance-level patches.

Every ``apply_*`` in mmaccel returns a :class:`PatchHandle`. The handle records each change
it makes to a model instance (attributes, forward hooks, diffusers hooks, attention
processors) and :meth:`PatchHandle.remove` undoes them in reverse order, restoring the model
bit-for-bit. Classes and other instances are never touched.

What diffusers adds to the model's modules while a patch is active is removed too: a
``_diffusers_hook`` registry that did not exist at apply time and holds no hook at removal (a
pipeline's ``transformer.cache_context(...)`` creates one on first use) is deleted, so the
instance attributes are exactly those before the patch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["PatchHandle"]

_MISSING = object()
_REGISTRY_ATTR = "_mmaccel_patches"
_DIFFUSERS_REGISTRY = "_diffusers_hook"


def _modules(model: Any) -> Iterator[torch.nn.Module]:
    """``model.modules()``, or nothing for a pipeline (its transformers carry their own handles)."""
    return model.modules() if isinstance(model, torch.nn.Module) else iter(())


class PatchHandle:
    """Undo log for the patches one technique installs on one model instance.

    Usable as a context manager: ``with apply_x(model, cfg): ...`` removes on exit.
    A technique may be applied to a model at most once at a time (``ValueError`` otherwise).
    """

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        active: set[str] = model.__dict__.setdefault(_REGISTRY_ATTR, set())
        if name in active:
            raise ValueError(
                f"{name} is already applied to this {type(model).__name__}; call .remove() on its handle first"
            )
        active.add(name)
        self._had_registry = {id(m) for m in _modules(model) if _DIFFUSERS_REGISTRY in m.__dict__}
        self.model = model
        self.name = name
        self._undo: list[Callable[[], None]] = []
        self._removed = False

    # -- recording -----------------------------------------------------------------------
    def set_attr(self, obj: Any, attr: str, value: Any) -> None:
        """Set ``obj.attr = value`` on the instance, remembering how to restore it.

        On removal the old value comes back only if ``obj.attr`` is still ``value``: whatever
        replaced it later is not ours to undo.
        """
        if isinstance(obj, torch.nn.Module):
            own = any(attr in d for d in (obj._parameters, obj._buffers, obj._modules)) or attr in obj.__dict__
        else:
            own = attr in getattr(obj, "__dict__", {})
        old = getattr(obj, attr) if own else _MISSING
        setattr(obj, attr, value)

        def undo() -> None:
            if getattr(obj, attr, _MISSING) is not value:
                return
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)

        self._undo.append(undo)

    def add_torch_hook(self, removable: torch.utils.hooks.RemovableHandle) -> None:
        """Track a handle returned by ``register_forward_hook`` and friends."""
        self._undo.append(removable.remove)

    def add_diffusers_hook(self, module: torch.nn.Module, hook: Any, hook_name: str) -> None:
        """Register a diffusers ``ModelHook`` on ``module`` under ``hook_name`` and track it.

        On removal the module's hook registry and instance ``forward`` are deleted again when
        this handle created them, so the module's ``__dict__`` is restored too. A wrapper that
        was put around ``forward`` after this hook (accelerate's offload hooks keep the wrapped
        forward in ``_old_forward``) survives: only our layer is taken out from under it.
        """
        from diffusers.hooks import HookRegistry

        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, hook_name)
        installed = module.__dict__["forward"]
        _invalidate_registry_caches(self.model)

        def undo() -> None:
            outer = module.__dict__.get("forward", _MISSING)
            wrapped_later = outer is not _MISSING and outer is not installed and registry._hook_order[-1:] == [hook_name]
            index = registry._hook_order.index(hook_name)
            later = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
            later_forward = later.forward if later is not None else None
            registry.remove_hook(hook_name, recurse=False)
            if later is not None and later.original_forward is not None:
                # a diffusers hook registered after ours with its own ``new_forward`` (a block cache):
                # diffusers re-points only its ``forward``, which would drop that hook's ``new_forward``
                # and keep calling ours through ``original_forward``; re-point ``original_forward``.
                later.original_forward, later.forward = later.forward, later_forward
            if wrapped_later:  # e.g. accelerate's hook: re-point its inner forward past our layer
                inner = module.__dict__.get("forward", _MISSING)
                if module.__dict__.get("_old_forward") is installed:
                    module._old_forward = inner if inner is not _MISSING else type(module).forward.__get__(module)
                module.forward = outer
            if not registry.hooks:  # a registry that existed empty (e.g. from CacheMixin.cache_context) stays
                if not had_registry:
                    del module._diffusers_hook
                if not had_forward and not wrapped_later:
                    module.__dict__.pop("forward", None)
            _invalidate_registry_caches(self.model)

        self._undo.append(undo)

    def set_processor(self, attention: torch.nn.Module, processor: Any) -> None:
        """Swap a diffusers ``Attention`` module's processor; on removal the old one comes back
        unless another processor replaced ours meanwhile."""
        old = attention.processor
        attention.set_processor(processor)

        def undo() -> None:
            if attention.processor is processor:
                attention.set_processor(old)

        self._undo.append(undo)

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the handle is removed (after the patches recorded later)."""
        self._undo.append(fn)

    # -- undo ----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return not self._removed

    def remove(self) -> None:
        """Undo every recorded patch, newest first. Calling it twice is a no-op."""
        if self._removed:
            return
        self._removed = True
        while self._undo:
            self._undo.pop()()
        self._drop_new_registries()
        active = self.model.__dict__.get(_REGISTRY_ATTR)
        if active is not None:
            active.discard(self.name)
            if not active:
                del self.model.__dict__[_REGISTRY_ATTR]

    def _drop_new_registries(self) -> None:
        """Delete the empty diffusers hook registries created on the model since apply."""
        dropped = False
        for module in _modules(self.model):
            registry = module.__dict__.get(_DIFFUSERS_REGISTRY)
            if registry is None or id(module) in self._had_registry or getattr(registry, "hooks", None):
                continue
            del module.__dict__[_DIFFUSERS_REGISTRY]
            dropped = True
        if dropped:
            _invalidate_registry_caches(self.model)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<PatchHandle {self.name} on {type(self.model).__name__} ({state}, {len(self._undo)} patches)>"


def _invalidate_registry_caches(model: torch.nn.Module) -> None:
    """Drop diffusers' cached child-registry lists, which go stale when hooks come and go."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry._child_registries_cache = None
