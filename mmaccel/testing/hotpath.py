"""Count what makes a forward slow on a GPU, on the CPU: host-device synchronisations and aten ops.

A GPU runs ahead of the Python host as long as the host never waits for a tensor's value. Every
read of a value on the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``,
``.numpy()``), every op whose output size depends on the data (``nonzero``, boolean indexing,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``) and every
explicit ``synchronize`` stalls the host until the device has caught up. On the CPU nothing waits,
but the same calls still happen, so :class:`HotPathCounter` counts them there, exactly:

- a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op (so also the op
  count, the second figure that predicts launch-bound GPU time), including
  ``aten._local_scalar_dense`` (behind ``.item()``, ``bool``, ``int``, ``float``) and the
  data-dependent ops above;
- the host copies that never reach the dispatcher on a CPU tensor (``Tensor.cpu``, ``.tolist``,
  ``.numpy``) and ``torch.cuda``'s synchronise calls are patched for the
  duration of the ``with`` block.

    with HotPathCounter() as count:
        model(**inputs)
    assert count.syncs == 0, count.sync_counts

:func:`compile_counts` adds the two compile figures: graph breaks (``torch._dynamo.explain``) and
how many graphs a run compiled (a counting backend over ``aot_eager`` or ``inductor``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CompileCounts", "HotPathCounter", "compile_counts", "count_hot_path"]

# aten ops whose output size depends on tensor values (a device->host read before the output
# can be allocated); ``aten._local_scalar_dense`` is the value read itself.
_DATA_DEPENDENT = {
    "aten::_local_scalar_dense": "item",
    "aten::nonzero": "nonzero",
    "aten::argwhere": "nonzero",
    "aten::masked_select": "masked_select",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::bincount": "bincount",
    "aten::_assert_async": "assert",
}
# ops that don't count as work (views and metadata) in ``ops``; they launch nothing on a GPU
_FREE = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::permute", "aten::transpose",
    "aten::t", "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias",
    "aten::as_strided", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::lift_fresh",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::unflatten", "aten::flatten", "aten::movedim",
    "aten::contiguous", "aten::_reshape_alias", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::is_same_size", "aten::view_as", "aten::expand_as", "aten::narrow",
}  # fmt: skip
# Python entry points that read a CPU tensor without dispatching (on a GPU each is a copy + sync)
_PATCHED_TENSOR = ("cpu", "tolist", "numpy")
_PATCHED_CUDA = ("synchronize",)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _is_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_cpu_device(x: Any) -> bool:
    return (isinstance(x, str) and x.split(":")[0] == "cpu") or (isinstance(x, torch.device) and x.type == "cpu")


class HotPathCounter(TorchDispatchMode):
    """Counts host-device synchronisations and aten ops inside its ``with`` block.

    ``sync_counts`` maps a kind (``item``, ``nonzero``, ``bool_index``, ``cpu``, ``tolist``, ...) to
    its count and ``syncs`` is their sum; ``op_counts`` maps each aten op to its count and ``ops``
    counts those that do work (views and metadata ops excluded). ``device_to_host`` counts copies
    from a non-CPU tensor to the CPU (only a GPU run has them). ``sync_sites`` maps
    ``"kind file.py:function"`` (the innermost caller outside torch) to its count: where each
    synchronisation comes from.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sync_counts: Counter[str] = Counter()
        self.sync_sites: Counter[str] = Counter()
        self.op_counts: Counter[str] = Counter()
        self._stack: contextlib.ExitStack | None = None

    def _record(self, kind: str) -> None:
        self.sync_counts[kind] += 1
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR) or
                                     frame.f_code.co_filename == __file__):  # fmt: skip
            frame = frame.f_back
        where = "?" if frame is None else f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
        self.sync_sites[f"{kind} {where}"] += 1

    @property
    def syncs(self) -> int:
        return sum(self.sync_counts.values())

    @property
    def ops(self) -> int:
        return sum(n for name, n in self.op_counts.items() if name not in _FREE)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name
        self.op_counts[name] += 1
        kind = _DATA_DEPENDENT.get(name)
        if kind is None and name in ("aten::index", "aten::index_put", "aten::index_put_") and _is_bool_index(args):
            kind = "bool_index"
        elif kind is None and name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            if isinstance(args[0], torch.Tensor) and (len(args) == 1 or isinstance(args[1], torch.Tensor)):
                kind = "repeat_interleave"
        elif kind is None and name in ("aten::_to_copy", "aten::copy_"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst_cpu = _is_cpu_device(kwargs.get("device")) if name == "aten::_to_copy" else args[0].device.type == "cpu"
            if dst_cpu and isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta"):
                kind = "device_to_host"
        if kind is not None:
            self._record(kind)
        return func(*args, **kwargs)

    def _patch(self, owner: Any, attr: str, kind: str) -> None:
        original = getattr(owner, attr)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._record(kind)
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        assert self._stack is not None
        self._stack.callback(setattr, owner, attr, original)

    def __enter__(self) -> HotPathCounter:
        self._stack = contextlib.ExitStack()
        for attr in _PATCHED_TENSOR:
            self._patch(torch.Tensor, attr, attr)
        for attr in _PATCHED_CUDA:
            self._patch(torch.cuda, attr, "synchronize")
        self._patch(torch.cuda.Event, "synchronize", "synchronize")
        self._patch(torch.cuda.Event, "elapsed_time", "synchronize")
        self._patch(torch.cuda.Stream, "synchronize", "synchronize")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            assert self._stack is not None
            self._stack.close()
            self._stack = None

    def summary(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "ops": self.ops, "sync_kinds": dict(sorted(self.sync_counts.items()))}


def count_hot_path(fn: Callable[[], Any]) -> HotPathCounter:
    """Run ``fn()`` once under a :class:`HotPathCounter` (without autograd) and return the counter."""
    with torch.no_grad(), HotPathCounter() as counter:
        fn()
    return counter


@dataclass(frozen=True)
class CompileCounts:
    """``graph_breaks`` of one call (``torch._dynamo.explain``) and ``compiles``: graphs compiled over
    a whole run of ``torch.compile(fn)`` (first calls and recompiles alike)."""

    graph_breaks: int
    graphs: int
    compiles: int
    break_reasons: tuple[str, ...]


class _CountingBackend:
    def __init__(self, backend: str) -> None:
        self.backend, self.compiles = backend, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)


def compile_counts(
    module: Callable[..., Any],
    calls: Iterator[tuple[tuple[Any, ...], dict[str, Any]]] | list[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    backend: str = "aot_eager",
) -> CompileCounts:
    """Graph breaks of the first call, then graphs compiled over all ``calls`` under ``torch.compile``.

    ``calls`` is a list of ``(args, kwargs)``, e.g. one per sampling step; ``module`` is compiled once
    (``torch.compile(module, backend=counting)``) and called with each in turn.
    """
    calls = list(calls)
    if not calls:
        raise ValueError("calls must hold at least one (args, kwargs) pair")
    torch._dynamo.reset()
    args, kwargs = calls[0]
    with torch.no_grad():
        explain = torch._dynamo.explain(module)(*args, **kwargs)
    torch._dynamo.reset()
    counting = _CountingBackend(backend)
    compiled = torch.compile(module, backend=counting)
    with torch.no_grad():
        for args, kwargs in calls:
            compiled(*args, **kwargs)
    torch._dynamo.reset()
    reasons = tuple(r.reason.splitlines()[0] for r in explain.break_reasons)
    return CompileCounts(explain.graph_break_count, explain.graph_count, counting.compiles, reasons)
