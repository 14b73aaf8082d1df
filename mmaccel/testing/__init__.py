"""Test helpers for mmaccel and its users: tiny random models of the real classes
(:mod:`mmaccel.testing.models`), the technique contract check (:mod:`mmaccel.testing.contract`) and
CPU offloading (:mod:`mmaccel.testing.offload`)."""

from mmaccel.testing.contract import check_technique_contract
from mmaccel.testing.models import (
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    TINY_BUILDERS,
    TINY_CALL_KWARGS,
    TINY_WAN_TRANSFORMER,
    TinyVLM,
    call_kwargs,
    load_tiny,
    save_tiny,
    tiny_cogvideox_pipeline,
    tiny_dit_pipeline,
    tiny_image,
    tiny_llava,
    tiny_llava_next,
    tiny_pixart_pipeline,
    tiny_tokenizer,
    tiny_wan_pipeline,
)

__all__ = [
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "TINY_BUILDERS",
    "TINY_CALL_KWARGS",
    "TINY_WAN_TRANSFORMER",
    "TinyVLM",
    "call_kwargs",
    "check_technique_contract",
    "load_tiny",
    "save_tiny",
    "tiny_cogvideox_pipeline",
    "tiny_dit_pipeline",
    "tiny_image",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_pixart_pipeline",
    "tiny_tokenizer",
    "tiny_wan_pipeline",
]
