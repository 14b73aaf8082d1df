"""Test helpers for mmaccel and its users: tiny random models of the real classes
(:mod:`mmaccel.testing.models`), the technique contract check (:mod:`mmaccel.testing.contract`),
CPU offloading (:mod:`mmaccel.testing.offload`) and the hot-path counters: host-device syncs, aten ops,
graph breaks and compiles (:mod:`mmaccel.testing.hotpath`)."""

from mmaccel.testing.contract import check_technique_contract
from mmaccel.testing.hotpath import CompileCounts, HotPathCounter, compile_counts, count_hot_path
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
    "CompileCounts",
    "HotPathCounter",
    "compile_counts",
    "count_hot_path",
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
