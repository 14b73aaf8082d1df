"""Run diffusers' own model tests with a technique applied to every transformer they create (issue #32).

A pytest plugin: ``pytest -p mmaccel.benchmarks.diffusers_suite tests/models/transformers/...`` in a
checkout of diffusers' test sources, with ``MMACCEL_DIFFUSERS_SUITE`` set to one of `SETTINGS`
(``none``, ``svg2-full``, ``svg2-reducing``, ``token_density-full``, ``token_density-reducing``,
``token_density-every_step``).
Every instance of a transformer class the technique supports that is built by the class itself
(``Model(**init)``, ``from_config``) or loaded by ``Model.from_pretrained`` gets the technique at
the budget of :mod:`mmaccel.benchmarks.contract_budgets`; its handle is the instance attribute `HANDLE_ATTR`.
Each test's report carries the user properties ``mmaccel_setting``, ``mmaccel_models`` (models
patched since the previous test's teardown: a class-scoped fixture's model counts for the test
that set it up), ``mmaccel_forwards`` (forwards, or SVG2 attention calls, recorded) and
``mmaccel_reduced`` (of those, the ones that ran below full density), which ``--junitxml`` writes.

``python -m mmaccel.benchmarks.diffusers_suite DIR`` reads ``DIR/<setting>.xml`` (one junit file per
setting, ``none`` among them) and prints the summary table and every test that passes unpatched
but not patched, with its first error line (`scripts/diffusers_model_tests.sh` runs the matrix).

``--mmaccel-compile-on-cpu`` runs diffusers' compile tests (``TorchCompileTesterMixin``, which
diffusers skips without an accelerator) on CPU.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mmaccel.benchmarks.contract_budgets import (
    svg2_at_budget,
    token_density_at_budget,
    token_density_at_every_step,
)
from mmaccel.diffusion.token_density import TokenDensityHandle
from mmaccel.runtime.patching import PatchHandle

__all__ = ["BUDGETS", "ENV", "HANDLE_ATTR", "SETTINGS", "ModelPatcher", "SuiteSetting", "summarize"]

ENV = "MMACCEL_DIFFUSERS_SUITE"
HANDLE_ATTR = "_mmaccel_suite_handle"

_APPLY: dict[str, Callable[[torch.nn.Module, bool], PatchHandle]] = {
    "svg2": svg2_at_budget,
    "token_density": token_density_at_budget,
}
#: the diffusers classes each technique is applied to (the families its contract tests cover)
CLASSES: dict[str, tuple[str, ...]] = {
    "svg2": ("WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel"),
    "token_density": ("DiTTransformer2DModel", "PixArtTransformer2DModel", "WanTransformer3DModel",
                      "CogVideoXTransformer3DModel", "FluxTransformer2DModel", "HunyuanVideoTransformer3DModel"),
}  # fmt: skip
#: full and reducing: `mmaccel.benchmarks.contract_budgets`; token density's ``every_step`` keeps 0.25 at every
#: timestep (its reducing schedule is dense below t ~ 390, where diffusers' Wan, CogVideoX and
#: HunyuanVideo test inputs are); SVG2 reduces at every step already (no dense warm-up)
BUDGETS: dict[str, tuple[str, ...]] = {
    "svg2": ("full", "reducing"),
    "token_density": ("full", "reducing", "every_step"),
}
SETTINGS = ("none", *(f"{t}-{b}" for t, budgets in BUDGETS.items() for b in budgets))


@dataclass(frozen=True)
class SuiteSetting:
    """A technique (None: unpatched) and its budget (one of `BUDGETS`)."""

    technique: str | None
    budget: str = "full"

    def __post_init__(self) -> None:
        if self.technique is not None and self.technique not in BUDGETS:
            raise ValueError(f"technique must be one of {sorted(BUDGETS)} or None, got {self.technique!r}")
        allowed = ("full",) if self.technique is None else BUDGETS[self.technique]
        if self.budget not in allowed:
            raise ValueError(f"budget of {self.technique} must be one of {allowed}, got {self.budget!r}")

    @classmethod
    def parse(cls, value: str) -> SuiteSetting:
        """``none`` or ``<technique>-<budget>``."""
        if value not in SETTINGS:
            raise ValueError(f"{ENV} must be one of {', '.join(SETTINGS)}; got {value!r}")
        if value == "none":
            return cls(None)
        technique, budget = value.split("-", 1)
        return cls(technique, budget)

    @property
    def name(self) -> str:
        return "none" if self.technique is None else f"{self.technique}-{self.budget}"

    def apply(self, model: torch.nn.Module) -> PatchHandle:
        if self.technique is None:
            raise ValueError("setting 'none' applies nothing")
        if self.budget == "every_step":
            return token_density_at_every_step(model)
        return _APPLY[self.technique](model, self.budget == "reducing")


def _work(handle: PatchHandle) -> tuple[int, int]:
    """(forwards or attention calls recorded, of which below full density)."""
    summary = handle.stats.summary()
    if isinstance(handle, TokenDensityHandle):
        return summary["forwards"], summary["reduced_forwards"]
    sparse, density = summary["sparse_calls"], summary["sparse_density"]  # SVG2: the mean over sparse calls
    return summary["calls"], sparse if density is not None and density < 1.0 else 0


class ModelPatcher:
    """Wraps ``__init__`` and ``from_pretrained`` of the setting's classes so that every instance
    they create gets the technique. `install` / `uninstall` set and restore the class attributes;
    `drain` hands over (and forgets) the handles made since the last call."""

    def __init__(self, setting: SuiteSetting) -> None:
        if not isinstance(setting, SuiteSetting):
            raise TypeError(f"setting must be a SuiteSetting, got {type(setting).__name__}")
        self.setting = setting
        self._handles: list[PatchHandle] = []
        self._restore: list[Callable[[], None]] = []
        self._loading = threading.local()

    def _apply(self, model: Any) -> None:
        handle = self.setting.apply(model)
        model.__dict__[HANDLE_ATTR] = handle
        self._handles.append(handle)

    def _is_loading(self) -> bool:
        return getattr(self._loading, "depth", 0) > 0

    def _patch_init(self, cls: type) -> None:
        init = cls.__dict__["__init__"]
        patcher = self

        @functools.wraps(init)
        def __init__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if type(self) is cls and not patcher._is_loading():  # from_pretrained applies after loading
                patcher._apply(self)

        cls.__init__ = __init__  # type: ignore[misc]
        self._restore.append(lambda: setattr(cls, "__init__", init))

    def _patch_from_pretrained(self, mixin: type, classes: tuple[type, ...]) -> None:
        own = mixin.__dict__["from_pretrained"]
        load = own.__func__
        patcher = self

        @functools.wraps(load)
        def from_pretrained(klass: type, *args: Any, **kwargs: Any) -> Any:
            patcher._loading.depth = getattr(patcher._loading, "depth", 0) + 1
            try:
                out = load(klass, *args, **kwargs)
            finally:
                patcher._loading.depth -= 1
            model = out[0] if isinstance(out, tuple) else out  # output_loading_info=True: (model, info)
            if type(model) in classes and not patcher._is_loading():
                patcher._apply(model)
            return out

        mixin.from_pretrained = classmethod(from_pretrained)  # type: ignore[attr-defined]
        self._restore.append(lambda: setattr(mixin, "from_pretrained", own))

    def install(self) -> None:
        if self._restore:
            raise RuntimeError("ModelPatcher is already installed")
        if self.setting.technique is None:
            return
        import diffusers

        classes = tuple(getattr(diffusers, name) for name in CLASSES[self.setting.technique])
        for cls in classes:
            self._patch_init(cls)
        self._patch_from_pretrained(diffusers.ModelMixin, classes)

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()

    def drain(self) -> list[PatchHandle]:
        handles, self._handles = self._handles, []
        return handles


# -- pytest hooks ----------------------------------------------------------------------------------

_PATCHER_KEY = pytest.StashKey[ModelPatcher]()


#: the reason of diffusers' ``require_accelerator`` skip (``tests/testing_utils.py``)
_ACCELERATOR_SKIP = "test requires a hardware accelerator"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--mmaccel-compile-on-cpu",
        action="store_true",
        help="run diffusers' TorchCompileTesterMixin tests on CPU: drop their 'requires a hardware accelerator' skip",
    )


def _is_accelerator_skip(mark: pytest.Mark) -> bool:
    return mark.name == "skipif" and mark.kwargs.get("reason") == _ACCELERATOR_SKIP


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--mmaccel-compile-on-cpu"):
        return
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or "TorchCompileTesterMixin" not in {c.__name__ for c in cls.__mro__}:
            continue
        for node in item.listchain():  # the skip is a class mark of the mixin
            node.own_markers[:] = [m for m in node.own_markers if not _is_accelerator_skip(m)]


def pytest_configure(config: pytest.Config) -> None:
    value = os.environ.get(ENV)
    if value is None:
        raise pytest.UsageError(
            f"-p mmaccel.benchmarks.diffusers_suite needs {ENV} set to one of {', '.join(SETTINGS)}"
        )
    try:
        setting = SuiteSetting.parse(value)
    except ValueError as err:
        raise pytest.UsageError(str(err)) from err
    patcher = ModelPatcher(setting)
    patcher.install()
    config.stash[_PATCHER_KEY] = patcher


def pytest_unconfigure(config: pytest.Config) -> None:
    patcher = config.stash.get(_PATCHER_KEY, None)
    if patcher is not None:
        patcher.uninstall()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    patcher = item.config.stash[_PATCHER_KEY]
    handles = patcher.drain()
    work = [_work(h) for h in handles]
    item.user_properties += [
        ("mmaccel_setting", patcher.setting.name),
        ("mmaccel_models", len(handles)),
        ("mmaccel_forwards", sum(w[0] for w in work)),
        ("mmaccel_reduced", sum(w[1] for w in work)),
    ]


# -- summary of a matrix run -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    outcome: str  # passed, failed, skipped
    message: str
    properties: dict[str, str]


def _results(path: Path) -> dict[str, _Result]:
    out: dict[str, _Result] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        bad = case.find("failure")
        bad = case.find("error") if bad is None else bad
        if bad is not None:
            lines = (bad.get("message") or bad.text or "").strip().splitlines()
            out[test] = _Result("failed", lines[0] if lines else "", props)
        elif case.find("skipped") is not None:
            out[test] = _Result("skipped", case.find("skipped").get("message", ""), props)  # type: ignore[union-attr]
        else:
            out[test] = _Result("passed", "", props)
    return out


def _broken(results: dict[str, _Result], base: dict[str, _Result]) -> list[str]:
    """Tests that pass in ``base`` (the unpatched run) but not in ``results``."""
    return [
        t for t, r in results.items() if r.outcome != "passed" and t in base and base[t].outcome == "passed"
    ]


def _lines(runs: dict[str, dict[str, _Result]]) -> Iterator[str]:
    yield "| setting | passed | failed | skipped | passed unpatched, not patched | tests that patched a model | tests that ran reduced |"
    yield "|---|---|---|---|---|---|---|"
    base = runs["none"]
    for name, results in runs.items():
        count = {k: sum(r.outcome == k for r in results.values()) for k in ("passed", "failed", "skipped")}
        broken = _broken(results, base)
        patched = sum(int(r.properties.get("mmaccel_models", "0")) > 0 for r in results.values())
        reduced = sum(int(r.properties.get("mmaccel_reduced", "0")) > 0 for r in results.values())
        extra = ("-", "-", "-") if name == "none" else (len(broken), patched, reduced)
        yield (
            f"| {name} | {count['passed']} | {count['failed']} | {count['skipped']} | "
            + " | ".join(map(str, extra))
            + " |"
        )
    for name, results in runs.items():
        if name == "none":
            continue
        broken = _broken(results, base)
        yield ""
        yield f"{name}: {len(broken)} test(s) pass unpatched but not patched"
        for test in broken:
            yield f"- {test} [{results[test].outcome}]: {results[test].message[:300]}"


def summarize(directory: str | os.PathLike[str]) -> str:
    """The markdown summary of the junit files ``<directory>/<setting>.xml`` (``none.xml`` required)."""
    root = Path(directory)
    runs = {s: _results(root / f"{s}.xml") for s in SETTINGS if (root / f"{s}.xml").is_file()}
    if "none" not in runs:
        raise ValueError(f"directory {str(root)!r} has no none.xml (the unpatched run)")
    return "\n".join(_lines(runs))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mmaccel.benchmarks.diffusers_suite DIR")
    print(summarize(sys.argv[1]))
