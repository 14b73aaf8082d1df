"""One import name (``mmaccel``), arrows only down (apps -> techniques -> runtime), one wheel."""

import ast
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["runtime", "vlm", "diffusion", "sparse_attn", "parallel_video", "tokenizers_img", "apps", "benchmarks"]
TECHNIQUES = {"vlm", "diffusion", "sparse_attn", "parallel_video", "tokenizers_img"}
PACKAGES = ["mmaccel", "mmaccel.testing", *(f"mmaccel.{f}" for f in FOLDERS)]

# What each layer may import from mmaccel (its own folder always). Techniques are independent:
# a long video combining clip parallelism with SVG2 composes them in the app, not in each other.
ALLOWED = {
    "runtime": {"runtime"},
    "testing": {"runtime"},
    **{t: {"runtime"} for t in TECHNIQUES},
    "apps": {"runtime", "testing", *TECHNIQUES},
    "benchmarks": {"runtime", "testing", "apps", *TECHNIQUES},
}


def _sources() -> list[tuple[str, Path]]:
    files = [("testing", p) for p in sorted((ROOT / "mmaccel" / "testing").glob("*.py"))]
    files.append(("mmaccel", ROOT / "mmaccel" / "__init__.py"))
    for folder in FOLDERS:
        files += [(folder, p) for p in sorted((ROOT / folder).rglob("*.py"))]
    return files


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module name ``path`` imports (also inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_source_imports_a_bare_folder_name():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for _, path in [*_sources(), *(("tests", p) for p in (ROOT / "tests").glob("*.py"))]
        for line, name in _imports(path)
        if name.split(".")[0] in FOLDERS
    ]
    assert not bad, "import mmaccel.<folder>, never the bare folder:\n" + "\n".join(bad)


def test_imports_point_only_down():
    bad = []
    for layer, path in _sources():
        allowed = ALLOWED.get(layer, set(FOLDERS) | {"testing"})
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "mmaccel" or len(parts) < 2:
                continue
            target = parts[1]
            if target != layer and target not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports mmaccel.{target}")
    assert not bad, "imports must point down (apps -> techniques -> runtime):\n" + "\n".join(bad)


def test_bare_folder_names_refuse_to_import():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import vlm"
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "import mmaccel.vlm" in out.stderr


def test_all_packages_import_in_a_fresh_interpreter():
    code = "import mmaccel; " + "; ".join(f"import {p}" for p in PACKAGES) + "; print(mmaccel.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()[0].isdigit()


@pytest.mark.parametrize("name", PACKAGES)
def test_public_names_exist(name):
    module = importlib.import_module(name)
    for public in getattr(module, "__all__", []):
        assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which is missing"


def test_runtime_loads_no_technique_package():
    code = (
        "import sys, mmaccel.runtime, mmaccel.runtime.distributed, mmaccel.runtime.environment, "
        "mmaccel.runtime.adapters.wan, mmaccel.runtime.timesteps; "
        f"bad = [m for m in sys.modules if m.split('.')[:2][-1] in {sorted(TECHNIQUES | {'apps'})!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_wheel_has_one_top_level_name(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("mmaccel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mmaccel"}, top
    for folder in FOLDERS:  # every module of every folder made it in
        for path in (ROOT / folder).rglob("*.py"):
            assert f"mmaccel/{path.relative_to(ROOT).as_posix()}" in names, path
    assert any(n.startswith("mmaccel/apps/zoo/models/") and n.endswith(".safetensors") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mmaccel = mmaccel.apps.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
