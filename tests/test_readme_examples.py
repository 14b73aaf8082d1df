"""Every ```python example in README.md, docs/dydit.md and docs/demo.md runs as written (in a fresh
interpreter, offline); the examples assert the values their comments print (issue #31)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), flags=re.S)


BLOCKS = _blocks("README.md")
# Fragments that continue an earlier block (they use its variables) are marked by a leading "# continued".
EXAMPLES = [b for b in BLOCKS if not b.startswith("# continued")]
# docs examples: the demo's tab functions time every tab on the zoo models (minutes on a CPU): slow
DOC_EXAMPLES = [
    pytest.param(code, id=f"{name}-{i}", marks=[pytest.mark.slow] if "run_vlm_tab" in code else [])
    for name in ("docs/dydit.md", "docs/demo.md")
    for i, code in enumerate(_blocks(name))
]


def _run(code: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"example failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"


def test_readme_has_examples():
    assert len(EXAMPLES) >= 5
    assert any("assert kept == (20, 7, 8, 3, 2)" in code for code in EXAMPLES)  # the HiRED example checks itself


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, tmp_path):
    _run(code, tmp_path)


@pytest.mark.parametrize("code", DOC_EXAMPLES)
def test_docs_example_runs(code, tmp_path):
    _run(code, tmp_path)
