"""The prepared GPU check (docs/gpu.md): the offline bundle, the stand-in site and the CPU dry run
of ``benchmarks/gpu/run.sh``, which must install the bundle into a fresh venv, resolve every
step on tiny shapes and collect (and skip) every ``cuda`` test."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "benchmarks" / "gpu"
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "ConnectionError", "Could not find a version", "No matching distribution")  # fmt: skip


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bundle = _load("bundle")
steps = _load("steps")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A bundle built as `make gpu-bundle` builds it, seeded with the checkout's downloaded wheels
    (so no download is repeated); skipped only when PyPI cannot be reached for a missing one."""
    out = tmp_path_factory.mktemp("bundle")
    for wheel in (ROOT / ".gpu-bundle").glob("*.whl"):
        if not wheel.name.startswith("mmaccel-"):
            shutil.copy2(wheel, out / wheel.name)
    try:
        bundle.build(out)
    except SystemExit as exc:
        if "pip download" in str(exc) and any(e in str(exc) for e in NETWORK_ERRORS):
            pytest.skip(f"the package registry is unreachable and the wheels are not cached: {str(exc)[:300]}")
        raise
    return out


def test_missing_on_gpu_is_what_the_gpu_machine_lacks():
    from importlib import metadata

    pins = bundle.missing_on_gpu()
    assert pins["diffusers"] == metadata.version("diffusers")
    assert "importlib-metadata" in pins  # diffusers needs it; the GPU image has only zipp
    assert pins["transformers"] == bundle.CARRIED_AT["transformers"]  # mmaccel needs >= 5.18, the GPU has 5.17
    assert not {"torch", "accelerate", "numpy", "mmaccel", "gradio"} & set(pins)


def test_a_requirement_the_gpu_packages_do_not_meet_is_refused(monkeypatch):
    monkeypatch.setitem(bundle.GPU_VERSIONS, "huggingface-hub", "0.20.0")
    with pytest.raises(SystemExit, match="huggingface-hub"):
        bundle.missing_on_gpu()


def test_carried_wheel_requirements_are_checked(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\nVersion: 1.0\nRequires-Dist: huggingface-hub>=1.31\n"
                   "Requires-Dist: tokenizers<0.24,>=0.23.1\nRequires-Dist: pytest; extra == 'dev'\n")  # fmt: skip
    bundle.check_carried_requirements(wheel, {})  # the GPU machine's hub 1.33 and tokenizers 0.23.2 do
    with pytest.raises(SystemExit, match="huggingface-hub"):
        bundle.check_carried_requirements(wheel, {"huggingface-hub": "1.0.0"})


def test_bundle_holds_what_is_missing_for_cp312_under_the_cap(built):
    manifest = json.loads((built / "bundle.json").read_text())
    wheels = manifest["wheels"]
    assert set(bundle.missing_on_gpu()) | {"mmaccel"} == set(wheels)
    files = sorted(p.name for p in built.glob("*.whl"))
    assert files == sorted(w["file"] for w in wheels.values())  # one version of each, nothing else
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in built.glob("*.whl")) < bundle.MAX_MB * 1e6
    for name in files:  # installable by CPython 3.12 on manylinux x86_64
        py, abi, plat = name[:-4].split("-")[-3:]
        assert ("py3" in py.split(".") or "cp312" in py.split(".")) and abi in ("none", "abi3", "cp312"), name
        assert plat == "any" or "x86_64" in plat, name
    names = zipfile.ZipFile(built / manifest["mmaccel_wheel"]).namelist()
    assert any(n == "mmaccel/apps/zoo/__init__.py" for n in names)  # the code ships, the zoo weights do not
    assert not any(n.startswith("mmaccel/apps/zoo/models/") for n in names)
    assert len(manifest["source_sha256"]) == 64


def test_rebuild_reuses_the_folder(built):
    before = {p.name: p.stat().st_mtime_ns for p in built.glob("*.whl")}
    same_sources = json.loads((built / "bundle.json").read_text())["source_sha256"] == bundle.source_hash()
    bundle.build(built)  # no download; no new project wheel while the sources are unchanged
    after = {p.name: p.stat().st_mtime_ns for p in built.glob("*.whl")}
    if not same_sources:  # the checkout changed since the fixture built (concurrent edits): only the
        before = {n: t for n, t in before.items() if not n.startswith("mmaccel-")}  # wheels must stay
        after = {n: t for n, t in after.items() if not n.startswith("mmaccel-")}
    assert before == after


def test_stand_in_site_has_the_gpu_packages_but_not_the_bundled_ones(built, tmp_path):
    linked = bundle.stand_in_site(tmp_path / "site", built)
    assert {"torch", "accelerate", "einops", "pytest"} <= set(linked)
    present = {p.name.lower() for p in (tmp_path / "site").iterdir()}
    assert "torch" in present and "transformers" not in present  # carried at 5.18: the bundle's copy is used
    assert not any(n.startswith(("diffusers", "gradio", "mmaccel", "importlib_metadata", "__editable__")) for n in present)


def test_report_marks_a_killed_step(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "status.tsv").write_text("hired\t0\t30\t50\nnar\t124\t45\t45\n")
    (work / "hired.json").write_text(json.dumps({"step": "hired", "status": "ok", "paper": "x", "settings": {},
                                                  "headers": ["a"], "rows": [[1]], "notes": [], "figures": {
                                                      "headline": {"figure": "HiRED 20% TTFT speed-up", "value": 3.1,
                                                                   "min": 2.9, "max": 3.3, "paper": 4.6}}}))  # fmt: skip
    steps.report(work, out)
    text = (out / "gpu_report.md").read_text()
    assert "| nar | 124 | 45 | 45 | KILLED at its time cap |" in text
    assert "**HiRED 20% TTFT speed-up: 3.10x (2.90-3.30)** vs paper 4.6x." in text
    figures = json.loads((out / "gpu_figures.json").read_text())
    assert figures["steps"]["nar"]["status"] == "missing" and figures["statuses"]["nar"]["rc"] == "124"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_figures.json", "gpu_report.md"]


def test_run_sh_without_a_bundle_says_how_to_build_one(tmp_path):
    env = {**os.environ, "GPU_BUNDLE": str(tmp_path / "none"), "DRY_RUN_PYTHON": sys.executable}
    out = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "make gpu-bundle" in out.stdout + out.stderr


def test_dry_run_installs_the_bundle_and_resolves_every_step(built, tmp_path):
    env = {**os.environ, "GPU_BUNDLE": str(built), "DRY_RUN_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=400)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    # its CPU time bounds its wall time on an idle 2-core machine (the issue: < 60 s); 13 s measured,
    # 35 s while idle OpenMP workers of the tiny steps spun on the loaded machine
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu_s < 30, f"the dry run took {cpu_s:.0f} s of CPU time"
    assert "DRY RUN OK" in log and "cuda tests collected and skipped" in log
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["gpu_figures.json", "gpu_report.md", "run.log"]  # the device returns at most 8 files
    figures = json.loads((tmp_path / "out" / "gpu_figures.json").read_text())
    assert {s: d["status"] for s, d in figures["steps"].items()} == dict.fromkeys(steps.STEPS, "ok")
    assert figures["steps"]["env"]["figures"]["problems"] == []
    assert figures["steps"]["env"]["settings"]["torch_threads"] == 1  # --tiny: one thread
    # the installed mmaccel is the bundle's, not the checkout's editable one
    assert "/site/mmaccel" in figures["steps"]["env"]["settings"]["mmaccel_from"]
    work = re.search(r"into (\S+)/site \(offline", log).group(1)  # in /dev/shm where it can
    assert Path(work).name.startswith("mmaccel-gpu.") and not Path(work).exists()  # run.sh cleans its work dir
