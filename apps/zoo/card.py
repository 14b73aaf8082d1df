"""Model cards for the reference zoo: one README.md per entry, written by its training script."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["DISCLAIMER", "write_model_card"]

DISCLAIMER = (
    "**This is a small reference model for testing and demonstration; it is not a general-purpose "
    "model.** It was trained from scratch on a CPU in minutes, on data that ships with a Python "
    "library or that the training script draws, so that mmaccel's fidelity figures, tests and demo "
    "run on a model with learned (not random) attention. Do not use it for anything else."
)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_model_card(
    output: Path,
    *,
    name: str,
    summary: str,
    architecture: str,
    data: str,
    training: str,
    metrics: Mapping[str, object],
    seed: int,
    train_seconds: float,
    limitations: str = "",
) -> Path:
    """Write ``output/README.md`` for zoo entry ``name`` and return its path."""
    from mmaccel.runtime.environment import machine_description

    for field, text in (("name", name), ("summary", summary), ("architecture", architecture),
                        ("data", data), ("training", training)):  # fmt: skip
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{field} must be a non-empty str")
    rows = "\n".join(f"| {key} | {_cell(value)} |" for key, value in metrics.items())
    sections = [
        f"# {name}\n\n{DISCLAIMER}\n\n{summary.strip()}",
        f"## Architecture\n\n{architecture.strip()}",
        f"## Data\n\n{data.strip()}",
        f"## Training\n\n{training.strip()}\n\n"
        f"Reproduce: `mmaccel zoo train {name} --seed {seed}` (writes this folder). "
        f"This copy: seed {seed}, {train_seconds / 60:.1f} min wall-clock on {machine_description()}.",
        f"## Metrics (measured at the end of training)\n\n| metric | value |\n|---|---|\n{rows}",
    ]
    if limitations.strip():
        sections.append(f"## Limitations\n\n{limitations.strip()}")
    sections.append(
        "## Load\n\n```python\nfrom mmaccel.apps.zoo import zoo_path\n"
        f'path = zoo_path("{name}")  # pass to the classes\' from_pretrained\n```'
    )
    path = Path(output) / "README.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
