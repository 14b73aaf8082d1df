"""Multimodal understanding: HiRED token dropping, VISTA steering, attention rebalancing, the VLM API."""

if __name__ != "mmaccel.vlm":  # installed as mmaccel.vlm; a second copy must never load
    raise ImportError("import mmaccel.vlm, not the bare folder name 'vlm'")

from mmaccel.vlm.api import VLM, SampleStats, StepClock, VLMOutput, load_image, load_vlm
from mmaccel.vlm.attention_balance import (
    AttentionBalanceConfig,
    AttentionBalanceHandle,
    apply_attention_balance,
)
from mmaccel.vlm.cls_attention import ClsAttentionRecorder, cls_attention_row
from mmaccel.vlm.hired import (
    SUPPORTED_MODELS,
    HiREDConfig,
    HiREDHandle,
    ImageSelection,
    apply_hired,
    select_visual_tokens,
)
from mmaccel.vlm.placeholders import shrink_placeholders
from mmaccel.vlm.steering import VISTAConfig, VISTAHandle, apply_vista, compute_steering_vectors

__all__ = [
    "HiREDConfig",
    "HiREDHandle",
    "ImageSelection",
    "SUPPORTED_MODELS",
    "apply_hired",
    "select_visual_tokens",
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
    "apply_vista",
    "compute_steering_vectors",
    "AttentionBalanceConfig",
    "AttentionBalanceHandle",
    "apply_attention_balance",
]
