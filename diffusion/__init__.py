"""Dynamic token density for diffusion transformers: a training-free plugin, the FlexDiT layout and DyDiT."""

if __name__ != "mmaccel.diffusion":  # installed as mmaccel.diffusion; a second copy must never load
    raise ImportError("import mmaccel.diffusion, not the bare folder name 'diffusion'")

from mmaccel.diffusion.dydit import DyDiTConfig, DyDiTStats, DyDiTTransformer2DModel, convert_to_dydit
from mmaccel.diffusion.dydit_train import DyDiTTrainConfig, train_dydit
from mmaccel.diffusion.flexdit import FlexDiTConfig, FlexDiTTransformer2DModel, convert_to_flexdit
from mmaccel.diffusion.presets import FAST_CACHES, FastConfig, FastHandle, apply_fast
from mmaccel.diffusion.regional import compile_repeated_blocks
from mmaccel.diffusion.token_density import (
    DensityStep,
    TokenDensityConfig,
    TokenDensityHandle,
    TokenDensityStats,
    apply_token_density,
    count_flops,
)
from mmaccel.diffusion.token_reduce import BipartiteMerge, GridPool
from mmaccel.diffusion.train import DistillConfig, LatentDataset, distill

__all__ = [
    "TokenDensityConfig",
    "apply_token_density",
    "TokenDensityHandle",
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
    "DyDiTConfig",
    "DyDiTTransformer2DModel",
    "DyDiTStats",
    "convert_to_dydit",
    "DyDiTTrainConfig",
    "train_dydit",
    "compile_repeated_blocks",
    "FAST_CACHES",
    "FastConfig",
    "FastHandle",
    "apply_fast",
]

