"""Multimodal understanding: HiRED visual-token dropping and the VLM inference API."""

from vlm.api import VLM, SampleStats, StepClock, VLMOutput, load_image, load_vlm
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
]
