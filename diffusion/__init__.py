"""Dynamic token density for diffusion transformers: a training-free plugin and the FlexDiT layout."""

if __name__ != "mmaccel.diffusion":  # installed as mmaccel.diffusion; a second copy must never load
    raise ImportError("import mmaccel.diffusion, not the bare folder name 'diffusion'")

from mmaccel.diffusion.flexdit import FlexDiTConfig, FlexDiTTransformer2DModel, convert_to_flexdit
from mmaccel.diffusion.token_density import (
    DensityStep,
    TokenDensityConfig,
    TokenDensityStats,
    apply_token_density,
    count_flops,
)
from mmaccel.diffusion.token_reduce import BipartiteMerge, GridPool
from mmaccel.diffusion.train import DistillConfig, LatentDataset, distill

__all__ = [
    "TokenDensityConfig",
    "apply_token_density",
    "TokenDensityStats",
    "DensityStep",
    "count_flops",
    "GridPool",
    "BipartiteMerge",
    "FlexDiTConfig",
    "FlexDiTTransformer2DModel",
    "convert_to_flexdit",
    "DistillConfig",
    "LatentDataset",
    "distill",
]
