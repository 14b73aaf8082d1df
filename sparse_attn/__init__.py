"""Semantic-aware sparse attention for video diffusion transformers (Sparse VideoGen2)."""

from sparse_attn.backends import flex_attention_available
from sparse_attn.kmeans import KMeansResult, kmeans
from sparse_attn.processors import (
    SUPPORTED_TRANSFORMERS,
    SparseAttentionHandle,
    SparseAttentionStats,
    SVG2CogVideoXAttnProcessor,
    SVG2WanAttnProcessor,
    apply_sparse_attention,
    pipeline_progress,
)
from sparse_attn.svg2 import (
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
