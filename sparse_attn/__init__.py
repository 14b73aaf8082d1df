"""SVG2: semantic-aware sparse attention for video diffusion transformers (Sparse VideoGen2)."""

if __name__ != "mmaccel.sparse_attn":  # installed as mmaccel.sparse_attn; a second copy must never load
    raise ImportError("import mmaccel.sparse_attn, not the bare folder name 'sparse_attn'")

from mmaccel.sparse_attn.backends import flex_attention_available
from mmaccel.sparse_attn.kmeans import KMeansResult, kmeans
from mmaccel.sparse_attn.svg2 import (
    PRESETS,
    SUPPORTED_TRANSFORMERS,
    AttentionInfo,
    Preset,
    SparseAttentionState,
    SVG2CogVideoXAttnProcessor,
    SVG2Config,
    SVG2Handle,
    SVG2HunyuanVideoAttnProcessor,
    SVG2Stats,
    SVG2WanAttnProcessor,
    apply_svg2,
    cluster_means,
    cluster_sparse_attention,
    dense_layer_count,
    dense_step_count,
    mask_density,
    min_kept_clusters,
    select_clusters,
    semantic_sparse_attention,
    tile_cluster_counts,
)

__all__ = [
    "PRESETS",
    "SUPPORTED_TRANSFORMERS",
    "AttentionInfo",
    "Preset",
    "KMeansResult",
    "SVG2CogVideoXAttnProcessor",
    "SVG2HunyuanVideoAttnProcessor",
    "SVG2Config",
    "SVG2Handle",
    "SVG2Stats",
    "SVG2WanAttnProcessor",
    "SparseAttentionState",
    "apply_svg2",
    "cluster_means",
    "cluster_sparse_attention",
    "dense_layer_count",
    "dense_step_count",
    "flex_attention_available",
    "kmeans",
    "mask_density",
    "min_kept_clusters",
    "select_clusters",
    "semantic_sparse_attention",
    "tile_cluster_counts",
]
