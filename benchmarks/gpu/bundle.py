"""Build the offline wheel bundle for the GPU machine, and the stand-in site for the CPU dry run.

    .venv/bin/python benchmarks/gpu/bundle.py build [--out .gpu-bundle]     # what `make gpu-bundle` runs
    .venv/bin/python benchmarks/gpu/bundle.py site DIR                      # dry run: the GPU machine's packages

``build`` writes into ``--out``: the project as a wheel (``pip wheel --no-deps`` of a copy of the
working tree), plus every distribution that the project (and diffusers) needs and the GPU machine's
Python lacks, walked from this venv's installed metadata with markers evaluated for CPython 3.12 on
Linux x86_64, pinned to this venv's versions and downloaded for that platform (``pip download
--no-deps --only-binary=:all:``). ``bundle.json`` lists each wheel with its version and sha256, and a
hash of the project's sources so ``run.sh`` can tell a bundle older than the tree it travels with.
The total must stay under ``--max-mb`` (40 MB).

``site DIR`` fills DIR with links to this venv's installed distributions that the GPU machine
also has (by name, :data:`GPU_PACKAGES`) plus what those need here, and never one the bundle
carries: a venv with ``DIR`` on a ``.pth`` line then sees torch/transformers as the GPU machine's
``python3`` would, without diffusers, gradio or the editable mmaccel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MB = 40.0
# The nvidia-h200 image's Python packages ("Python packages already there", read 2026-11-17).
GPU_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Versions seen there (KINDS.md's pip list): the bundle's requirements are checked against them.
GPU_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0"}  # fmt: skip
# A GPU package that a requirement refuses travels at this version (the oldest mmaccel supports,
# so the GPU run also checks the floor): {name: version}. Any other refusal stops the build.
CARRIED_AT = {"transformers": "5.18.0"}
# Carried beyond what mmaccel's own requirements reach (none today: no GPU step writes MP4, and
# imageio-ffmpeg's ~30 MB wheel alone would break the 40 MB cap).
EXTRA: tuple[str, ...] = ()
# The GPU machine's target, as the device notes give it (pip matches manylinux_2_N exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64")  # fmt: skip
SOURCE_FOLDERS = ("mmaccel", "runtime", "vlm", "diffusion", "sparse_attn", "parallel_video", "tokenizers_img",
                  "apps", "benchmarks")  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: metadata.Distribution, extras: tuple[str, ...] = ()) -> list:
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}  # fmt: skip
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def missing_on_gpu(roots: tuple[str, ...] = ("mmaccel", "diffusers", *EXTRA)) -> dict[str, str]:
    """{distribution: version to carry} for every requirement reached from ``roots`` that the GPU
    machine lacks (this venv's version), or has at a version a requirement refuses (the oldest
    version mmaccel supports, :data:`CARRIED_AT`: transformers 5.17 there, mmaccel needs >= 5.18;
    :func:`build` checks that wheel's own requirements). mmaccel itself travels as its own wheel."""
    found: dict[str, str] = {}
    todo, seen = list(roots), set()
    problems = []
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        if name in GPU_PACKAGES:
            continue
        dist = metadata.distribution(name)
        if name != "mmaccel":
            found[name] = dist.version
        for req in _requirements(dist):
            r = norm(req.name)
            if r in GPU_VERSIONS and not req.specifier.contains(GPU_VERSIONS[r], prereleases=True):
                if r in CARRIED_AT and req.specifier.contains(CARRIED_AT[r], prereleases=True):
                    found[r] = CARRIED_AT[r]
                else:
                    problems.append(f"{name} needs {req}, the GPU machine has {r} {GPU_VERSIONS[r]}")
            todo.append(r)
    if problems:
        raise SystemExit("bundle: requirements the GPU machine's packages do not meet:\n  " + "\n  ".join(problems))
    return found


def check_carried_requirements(wheel: Path, carried: dict[str, str]) -> None:
    """A :data:`CARRIED_AT` wheel's own requirements must be met by what the GPU machine has or
    the bundle carries (read from the wheel: this venv holds another version)."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    env = {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    problems = []
    for line in Parser().parsestr(text).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        r = norm(req.name)
        have = carried.get(r, GPU_VERSIONS.get(r))
        if have is None and r not in GPU_PACKAGES:
            problems.append(f"{wheel.name} needs {req}, which neither the GPU machine nor the bundle has")
        elif have is not None and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{wheel.name} needs {req}, the GPU machine / bundle has {r} {have}")
    if problems:
        raise SystemExit("bundle: " + "\n  ".join(problems))


def source_hash(root: Path = ROOT) -> str:
    """sha256 over the project's Python sources and pyproject.toml (what the wheel is built from)."""
    h = hashlib.sha256()
    files = [root / "pyproject.toml"] + sorted(p for f in SOURCE_FOLDERS for p in (root / f).rglob("*.py")
                                               if "__pycache__" not in p.parts)  # fmt: skip
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ZOO_WEIGHTS = "apps/zoo/models/"


def _tree_copy(dest: Path) -> None:
    """Copy the working tree (tracked + untracked-not-ignored files) so the build never touches
    the checkout's build/ folder that other builds may be using. The zoo's weights stay out: no
    GPU step uses them (real shapes, random weights), and they would put the bundle over its cap
    and the carried tree over the device tool's 64 MiB."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not rel.startswith((".gpu-bundle/", "tests/", ZOO_WEIGHTS)):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def build(out: Path, max_mb: float = MAX_MB, pip: tuple[str, ...] = (sys.executable, "-m", "pip")) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pins = missing_on_gpu()
    wheels: dict[str, dict] = {}
    for name, version in sorted(pins.items()):
        have = [p for p in out.glob("*.whl") if norm(p.name.split("-")[0]) == name and p.name.split("-")[1] == version]
        if not have:  # download only what the folder lacks (a rebuild works offline)
            cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                   "--implementation", "cp", "--abi", "cp312", *(a for p in PLATFORMS for a in ("--platform", p)),
                   "-d", str(out), f"{name}=={version}"]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise SystemExit(f"bundle: pip download {name}=={version} failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
            have = [p for p in out.glob("*.whl") if norm(p.name.split("-")[0]) == name and p.name.split("-")[1] == version]
        (wheel,) = have
        if name in CARRIED_AT:
            check_carried_requirements(wheel, pins)
        wheels[name] = {"file": wheel.name, "version": version}
    digest = source_hash()
    stale = [p for p in out.glob("mmaccel-*.whl")]
    old = json.loads((out / "bundle.json").read_text()) if (out / "bundle.json").exists() else {}
    if not (old.get("source_sha256") == digest and stale and all(p.name == old.get("mmaccel_wheel") for p in stale)):
        for p in stale:
            p.unlink()
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            _tree_copy(src)
            res = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
            if res.returncode != 0:
                raise SystemExit(f"bundle: pip wheel of the project failed:\n{res.stderr[-3000:]}")
    (project,) = out.glob("mmaccel-*.whl")
    wheels["mmaccel"] = {"file": project.name, "version": project.name.split("-")[1]}
    keep = {w["file"] for w in wheels.values()}
    for p in out.glob("*.whl"):  # other versions would make the offline install ambiguous
        if p.name not in keep:
            p.unlink()
    for w in wheels.values():
        w["sha256"] = _sha256(out / w["file"])
        w["bytes"] = (out / w["file"]).stat().st_size
    total = sum(w["bytes"] for w in wheels.values())
    manifest = {"wheels": wheels, "total_bytes": total, "source_sha256": digest, "mmaccel_wheel": project.name,
                "python": "cp312 manylinux x86_64", "gpu_packages_read": "2026-11-17"}  # fmt: skip
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for _, w in sorted(wheels.items()):
        print(f"  {w['file']:<60} {w['bytes'] / 1e6:7.2f} MB")
    print(f"  total {total / 1e6:.2f} MB (cap {max_mb:g} MB) in {out}")
    if total > max_mb * 1e6:
        raise SystemExit(f"bundle: {total / 1e6:.1f} MB is over the {max_mb:g} MB cap")
    return manifest


def stand_in_site(dest: Path, bundle: Path) -> list[str]:
    """Link into ``dest`` the installed files of this venv's distributions that the GPU machine has
    (plus their needs here), leaving out every distribution ``bundle`` carries. Returns the names linked."""
    carried = {norm(n) for n in json.loads((bundle / "bundle.json").read_text())["wheels"]}
    todo = [d.metadata["Name"] for d in metadata.distributions() if norm(d.metadata["Name"]) in GPU_PACKAGES]
    linked: set[str] = set()
    while todo:
        name = norm(todo.pop())
        if name in linked or name in carried:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        linked.add(name)
        todo += [r.name for r in _requirements(dist)]
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if top.endswith(".pth") or top == "__pycache__" or top.startswith("__editable__"):
                continue
            link = dest / top
            if not link.exists() and (base / top).exists():
                dest.mkdir(parents=True, exist_ok=True)
                link.symlink_to(base / top)
    return sorted(linked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the wheel folder for the GPU machine")
    b.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    b.add_argument("--max-mb", type=float, default=MAX_MB)
    s = sub.add_parser("site", help="link the GPU machine's packages (as this venv has them) into DIR")
    s.add_argument("dir", type=Path)
    s.add_argument("--bundle", type=Path, default=ROOT / ".gpu-bundle")
    h = sub.add_parser("hash", help="print the sources' hash (run.sh compares it with bundle.json)")
    h.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.out, args.max_mb)
    elif args.cmd == "site":
        names = stand_in_site(args.dir, args.bundle)
        print(f"stand-in site {args.dir}: {len(names)} distributions linked")
    else:
        print(source_hash(args.root))


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    main()
