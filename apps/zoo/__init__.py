"""The reference zoo: small models trained on this machine's CPU, shipped as safetensors.

Random-weight models attend almost uniformly, so "accuracy kept at 20% budget" means little on
them. Each zoo entry is a real diffusers/transformers class (or the repo's own tokenizer/GPT)
trained by a script in this package on data that ships inside a library (scikit-learn digits)
or that the script draws. ``mmaccel zoo train NAME`` reproduces an entry; ``zoo_path(NAME)`` is
the folder to hand to ``from_pretrained``. These are reference models for testing and
demonstration, not general-purpose models.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

__all__ = ["ZOO_DIR", "REGISTRY", "zoo_module", "zoo_path", "train_model"]

#: Where the committed weights live (package data).
ZOO_DIR = Path(__file__).resolve().parent / "models"

#: name -> module with ``NAME``, ``train(output, *, seed, progress)`` and ``load(path=None, ...)``.
REGISTRY: dict[str, str] = {
    "digit-classifier": "mmaccel.apps.zoo.digits",
    "digits-dit": "mmaccel.apps.zoo.digits_dit",
    "digits-dydit": "mmaccel.apps.zoo.digits_dydit",
    "moving-digits": "mmaccel.apps.zoo.moving_digits",
    "shapes-vlm": "mmaccel.apps.zoo.shapes_vlm",
    "shapes-vlm-seed1": "mmaccel.apps.zoo.shapes_vlm_seed1",
    "digits-nar": "mmaccel.apps.zoo.digits_nar",
}


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(REGISTRY)}")


def zoo_module(name: str) -> ModuleType:
    """The training/loading module of zoo entry ``name``."""
    _check_name(name)
    return importlib.import_module(REGISTRY[name])


def zoo_path(name: str) -> Path:
    """The folder holding entry ``name``'s weights; ``FileNotFoundError`` if it has none."""
    _check_name(name)
    path = ZOO_DIR / name
    if not any(path.rglob("*.safetensors")):
        raise FileNotFoundError(
            f"zoo model {name!r} has no weights in {path}; run `mmaccel zoo train {name}`"
        )
    return path


def train_model(
    name: str, output: str | Path | None = None, seed: int | None = None, progress: bool = True
) -> dict[str, object]:
    """Train entry ``name`` from scratch into ``output`` (default: its zoo folder); returns its metrics.
    ``seed`` defaults to the seed of the committed weights (the module's ``SEED``, else 0)."""
    module = zoo_module(name)
    if seed is None:
        seed = getattr(module, "SEED", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    target = ZOO_DIR / name if output is None else Path(output)
    target.mkdir(parents=True, exist_ok=True)
    return module.train(target, seed=seed, progress=progress)
