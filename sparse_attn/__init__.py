"""Semantic-aware sparse attention for video diffusion transformers (Sparse VideoGen2)."""

if __name__ != "mmaccel.sparse_attn":  # installed as mmaccel.sparse_attn; a second copy must never load
    raise ImportError("import mmaccel.sparse_attn, not the bare folder name 'sparse_attn'")

from mmaccel.sparse_attn.backends import flex_attention_available
from mmaccel.sparse_attn.kmeans import KMeansResult, kmeans
from mmaccel.sparse_attn.processors import (
    SUPPORTED_TRANSFORMERS,
    SparseAttentionHandle,
    SparseAttentionStats,
    SVG2CogVideoXAttnProcessor,
    SVG2WanAttnProcessor,
    apply_sparse_attention,
    pipeline_progress,
)
from mmaccel.sparse_attn.svg2 import (
    AttentionInfo,
    SparseAttentionState,
    SVG2Config,
    cluster_means,
    cluster_sparse_attention,
    mask_density,
    select_clusters,
    semantic_sparse_attention,
)

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "AttentionInfo",
    "KMeansResult",
    "SVG2CogVideoXAttnProcessor",
    "SVG2Config",
    "SVG2WanAttnProcessor",
    "SparseAttentionHandle",
    "SparseAttentionState",
    "SparseAttentionStats",
    "apply_sparse_attention",
    "cluster_means",
    "cluster_sparse_attention",
    "flex_attention_available",
    "kmeans",
    "mask_density",
    "pipeline_progress",
    "select_clusters",
    "semantic_sparse_attention",
]
