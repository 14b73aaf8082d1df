"""Dynamic token density for diffusion transformers: a training-free plugin and the FlexDiT layout."""

from diffusion.flexdit import FlexDiTConfig, FlexDiTTransformer2DModel, convert_to_flexdit
from diffusion.token_density import (
    DensityStep,
    TokenDensityConfig,
    TokenDensityStats,
    apply_token_density,
    count_flops,
)
from diffusion.token_reduce import BipartiteMerge, GridPool
from diffusion.train import DistillConfig, LatentDataset, distill

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
