"""The shared layer: token budgets, reversible patches, the distributed runtime, environment probes."""

from runtime.budget import (
    ConstantSchedule,
    CosineSchedule,
    DensitySchedule,
    LinearSchedule,
    StepSchedule,
    TokenBudget,
    allocate,
    top_p_mask,
)
from runtime.patching import PatchHandle

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
