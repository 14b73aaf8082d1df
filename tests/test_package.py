import importlib
import subprocess
import sys

import pytest

PACKAGES = ["runtime", "vlm", "diffusion", "sparse_attn", "parallel_video", "tokenizers_img", "apps"]


def test_all_packages_import_in_a_fresh_interpreter():
    code = "import " + ", ".join(PACKAGES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", PACKAGES)
def test_public_names_exist(name):
    module = importlib.import_module(name)
    for public in getattr(module, "__all__", []):
        assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which is missing"


def test_runtime_does_not_import_technique_packages():
    code = (
        "import sys, runtime, runtime.distributed, runtime.environment; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {PACKAGES[1:-1]!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
