"""Multimodal understanding: HiRED and FastV token dropping, VISTA steering, attention rebalancing, the VLM API."""

if __name__ != "mmaccel.vlm":  # installed as mmaccel.vlm; a second copy must never load
    raise ImportError("import mmaccel.vlm, not the bare folder name 'vlm'")

from mmaccel.vlm.api import VLM, SampleStats, StepClock, VLMOutput, load_image, load_vlm
from mmaccel.vlm.attention_balance import (
    AttentionBalanceConfig,
    AttentionBalanceHandle,
    AttentionBalanceStats,
    apply_attention_balance,
)
from mmaccel.vlm.cls_attention import ClsAttentionRecorder, cls_attention_row
from mmaccel.vlm.fastv import FastVConfig, FastVHandle, FastVStats, apply_fastv
from mmaccel.vlm.hired import (
    HiREDConfig,
    HiREDHandle,
    HiREDStats,
    ImageSelection,
    apply_hired,
    select_visual_tokens,
)
from mmaccel.vlm.placeholders import shrink_placeholders
from mmaccel.vlm.vista import VISTAConfig, VISTAHandle, VISTAStats, apply_vista, compute_steering_vectors

__all__ = [
    "HiREDConfig",
    "HiREDHandle",
    "HiREDStats",
    "ImageSelection",
    "apply_hired",
    "select_visual_tokens",
    "FastVConfig",
    "FastVHandle",
    "FastVStats",
    "apply_fastv",
    "cls_attention_row",
    "ClsAttentionRecorder",
    "shrink_placeholders",
    "VLM",
    "VLMOutput",
    "SampleStats",
    "StepClock",
    "load_vlm",
    "load_image",
    "VISTAConfig",
    "VISTAHandle",
    "VISTAStats",
    "apply_vista",
    "compute_steering_vectors",
    "AttentionBalanceConfig",
    "AttentionBalanceHandle",
    "AttentionBalanceStats",
    "apply_attention_balance",
]
