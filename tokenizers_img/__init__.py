"""Image tokenizers (2-D VQ grid, 1-D compact tokens) and next-neighbour autoregressive decoding."""

if __name__ != "mmaccel.tokenizers_img":  # installed as mmaccel.tokenizers_img; a second copy must never load
    raise ImportError("import mmaccel.tokenizers_img, not the bare folder name 'tokenizers_img'")

from mmaccel.tokenizers_img.compact_1d import Compact1DConfig, Compact1DLoss, Compact1DTokenizer, FSQuantizer
from mmaccel.tokenizers_img.decoding import Decoded, decode
from mmaccel.tokenizers_img.gpt import GPT, GPTConfig, KVCache, rope_2d
from mmaccel.tokenizers_img.nar import generate_nar
from mmaccel.tokenizers_img.orders import (
    Schedule,
    Step,
    group_mask,
    nar_schedule,
    par_schedule,
    proximity_mask,
    raster_schedule,
)
from mmaccel.tokenizers_img.raster import generate_raster
from mmaccel.tokenizers_img.sampling import SamplingConfig, apply_cfg, sample_logits
from mmaccel.tokenizers_img.vq import VectorQuantizer, VQConfig, VQModel, VQOutput, load_state_dict_file

__all__ = [
    "VQConfig",
    "VQModel",
    "VQOutput",
    "VectorQuantizer",
    "load_state_dict_file",
    "Compact1DConfig",
    "Compact1DTokenizer",
    "Compact1DLoss",
    "FSQuantizer",
    "GPT",
    "GPTConfig",
    "KVCache",
    "rope_2d",
    "Schedule",
    "Step",
    "raster_schedule",
    "nar_schedule",
    "par_schedule",
    "group_mask",
    "proximity_mask",
    "SamplingConfig",
    "sample_logits",
    "apply_cfg",
    "decode",
    "Decoded",
    "generate_nar",
    "generate_raster",
]
