"""Multimodal understanding: HiRED token dropping, VISTA steering, attention rebalancing, the VLM API."""

from vlm.api import VLM, SampleStats, StepClock, VLMOutput, load_image, load_vlm
from vlm.attention_balance import AttentionBalanceConfig, AttentionBalanceHandle, apply_attention_balance
from vlm.cls_attention import ClsAttentionRecorder, cls_attention_row
from vlm.hired import (
    SUPPORTED_MODELS,
    HiREDConfig,
    HiREDHandle,
    ImageSelection,
    apply_hired,
    select_visual_tokens,
)
from vlm.placeholders import shrink_placeholders
from vlm.steering import VISTAConfig, VISTAHandle, apply_vista, compute_steering_vectors

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
