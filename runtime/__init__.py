"""The shared layer: token budgets, reversible patches, the distributed runtime, environment probes."""

if __name__ != "mmaccel.runtime":  # installed as mmaccel.runtime; a second copy must never load
    raise ImportError("import mmaccel.runtime, not the bare folder name 'runtime'")

from mmaccel.runtime.budget import (
    ConstantSchedule,
    CosineSchedule,
    DensitySchedule,
    LinearSchedule,
    StepSchedule,
    TokenBudget,
    allocate,
    top_p_mask,
)
from mmaccel.runtime.patching import PatchHandle

__all__ = [
    "TokenBudget",
    "allocate",
    "top_p_mask",
    "DensitySchedule",
    "ConstantSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "StepSchedule",
    "PatchHandle",
]
