"""Image tokenizers (2-D VQ grid, 1-D compact tokens) and next-neighbour autoregressive decoding."""

from tokenizers_img.compact_1d import Compact1DConfig, Compact1DLoss, Compact1DTokenizer, FSQuantizer
from tokenizers_img.decoding import Decoded, decode
from tokenizers_img.gpt import GPT, GPTConfig, KVCache, rope_2d
from tokenizers_img.nar import generate_nar
from tokenizers_img.orders import (
    Schedule,
    Step,
    group_mask,
    nar_schedule,
    par_schedule,
    proximity_mask,
    raster_schedule,
)
from tokenizers_img.raster import generate_raster
from tokenizers_img.sampling import SamplingConfig, apply_cfg, sample_logits
from tokenizers_img.vq import VectorQuantizer, VQConfig, VQModel, VQOutput, load_state_dict_file

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
