"""Tiny random-initialised instances of the real transformers / diffusers classes.

One place that builds the models used by tests, benchmarks and the demo. Every builder is
deterministic (seeded, without disturbing the global RNG), needs no network (the tokenizers are
built from an in-code vocabulary), takes well under 2 s on CPU, and returns the real classes
(`LlavaForConditionalGeneration`, `DiTPipeline`, `WanPipeline`, ...), so the code paths under
test are the library's own. `save_tiny` / `load_tiny` exercise `save_pretrained` /
`from_pretrained` on a local folder.

    from mmaccel.testing import tiny_wan_pipeline, call_kwargs
    pipe = tiny_wan_pipeline()
    frames = pipe(**call_kwargs("wan")).frames          # (1, 9, 64, 96, 3) float in [0, 1]

    model, processor = tiny_llava()
    inputs = processor(images=tiny_image(), text=TINY_CALL_KWARGS["llava"]["text"], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=4)

Sizes are chosen so the token grids look like the real models' in shape, only smaller:
LLaVA-1.5: 64 visual tokens (8x8 patches + [CLS]); LLaVA-NeXT: 64 tokens per partition, 2-5
partitions; DiT / PixArt: 16x16 = 256 image tokens (as DiT-XL/2 at 256 px); Wan / CogVideoX at
64x96 px, 9 frames: 3 latent frames of 4x6 tokens.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "TINY_WAN_TRANSFORMER",
    "FLUX_DEV_TRANSFORMER",
    "HUNYUAN_VIDEO_TRANSFORMER",
    "WAN22_BOUNDARY_RATIO",
    "WAN22_TI2V_5B_TRANSFORMER",
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "TINY_BUILDERS",
    "TINY_CALL_KWARGS",
    "TinyVLM",
    "call_kwargs",
    "load_tiny",
    "save_tiny",
    "tiny_cogvideox_pipeline",
    "tiny_dit_pipeline",
    "tiny_flux_inputs",
    "tiny_flux_transformer",
    "tiny_hunyuan_video_inputs",
    "tiny_hunyuan_video_transformer",
    "tiny_image",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_pixart_pipeline",
    "tiny_tokenizer",
    "tiny_wan22_pipeline",
    "tiny_wan22_ti2v_pipeline",
    "tiny_wan_pipeline",
]

IMAGE_TOKEN = "<image>"

#: LLaVA-1.5 / vicuna style chat template (the one llava-hf checkpoints ship, minus generation tags).
#: Message content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...}.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: A small closed vocabulary: whole words the prompts below use, plus single characters so any
#: ASCII text tokenizes without <unk>.
_WORDS = (
    "a an the of and to in is it on at with for this that these what how many where who which "
    "image picture photo video frame scene describe show shown there are was were be do does "
    "cat dog man woman person people child car bus tree house street sky sea water grass "
    "red green blue white black yellow orange brown color colour big small left right top bottom "
    "yes no one two three four five walking running sitting standing flying astronaut rocket "
    "user assistant system please answer question"
).split()


class TinyVLM(NamedTuple):
    """A vision-language model with its processor; unpacks as ``model, processor``."""

    model: Any  # transformers PreTrainedModel
    processor: Any  # transformers ProcessorMixin


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the block without changing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# Offline tokenizers
# --------------------------------------------------------------------------------------------


def tiny_tokenizer(style: str = "llama"):
    """Build a SentencePiece-like Unigram tokenizer offline (no Hub access).

    ``style="llama"``: ``<unk>``=0, ``<s>``=1, ``</s>``=2, prepends ``<s>``, then ``<image>`` and
    ``<pad>`` appended at the end of the vocabulary (as llava-hf does), left padding.
    ``style="t5"``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, appends ``</s>``, right padding.
    Returns a ``PreTrainedTokenizerFast`` that round-trips through ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style not in ("llama", "t5"):
        raise ValueError(f"style must be 'llama' or 't5', got {style!r}")
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("▁", -2.0)] + [(c, -5.0) for c in chars + "\n"] + [("▁" + c, -4.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in _WORDS] + [
        ("▁" + w.upper() + ":", -0.5) for w in ("user", "assistant")
    ]
    specials = ["<unk>", "<s>", "</s>"] if style == "llama" else ["<pad>", "</s>", "<unk>"]
    vocab = [(s, 0.0) for s in specials] + pieces

    backend = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            padding_side="left",
        )
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tok.add_special_tokens({"pad_token": "<pad>"})
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
            padding_side="right",
        )
    tok.model_max_length = 2048
    return tok


def tiny_image(height: int = 64, width: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: smooth colour gradients, a bright disc and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float64)
    img = np.stack([xx, yy, 0.5 * (1 - xx)], axis=-1) * 0.6 + disc[..., None] * rng.uniform(0.3, 0.4, 3)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Vision-language models (transformers)
# --------------------------------------------------------------------------------------------

_VISION = dict(  # CLIP-ViT with [CLS]; 64 px / patch 8 -> 8x8 = 64 patch tokens (+1 CLS)
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    image_size=64, patch_size=8, projection_dim=32, num_channels=3,
)  # fmt: skip
_TEXT = dict(  # Llama with GQA (4 query heads, 2 KV heads, head_dim 16)
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def _image_processor_cls(name: str):
    """The PIL backend when transformers has one (5.x; no torchvision needed), else the classic class."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _vlm_configs(tok, image_size: int) -> tuple[Any, Any, dict]:
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(**{**_VISION, "image_size": image_size})
    text = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **_TEXT,
    )  # fmt: skip
    common = dict(
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        image_seq_length=(image_size // _VISION["patch_size"]) ** 2,
    )
    return vision, text, common


def _finish_vlm(model, tok, device, dtype):
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device=device, dtype=dtype).eval()


def tiny_llava(
    seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TinyVLM:
    """LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

    CLIP tower 64 px / patch 8 / 4 layers / hidden 32 (64 image tokens after dropping [CLS]),
    Llama 4 layers / hidden 64 / GQA 4:2, feature layer -2, strategy "default".
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer("llama")
    size = _VISION["image_size"]
    vision, text, common = _vlm_configs(tok, size)
    config = LlavaConfig(vision_config=vision, text_config=text, **common)
    with _seeded(seed):
        model = LlavaForConditionalGeneration(config)
    image_processor = _image_processor_cls("CLIPImageProcessor")(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=_VISION["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    return TinyVLM(_finish_vlm(model, tok, device, dtype), processor)


#: anyres resolutions for the 64 px base: 1, 2 (portrait / landscape) or 4 crops.
LLAVA_NEXT_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]


def tiny_llava_next(
    seed: int = 0, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TinyVLM:
    """LLaVA-NeXT-shaped ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``.

    Same tower/LLM as `tiny_llava`; anyres with ``LLAVA_NEXT_PINPOINTS`` so a square image gets
    1 + 1 partitions, a 2:1 image 1 + 2 and a large square 1 + 4 (64 tokens each), plus
    ``image_newline``. Tokenizer pads on the left for batched generation.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tok = tiny_tokenizer("llama")
    size = _VISION["image_size"]
    vision, text, common = _vlm_configs(tok, size)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **common
    )
    with _seeded(seed):
        model = LlavaNextForConditionalGeneration(config)
    image_processor = _image_processor_cls("LlavaNextImageProcessor")(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=_VISION["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    return TinyVLM(_finish_vlm(model, tok, device, dtype), processor)


# --------------------------------------------------------------------------------------------
# Diffusion pipelines (diffusers)
# --------------------------------------------------------------------------------------------

_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
           relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)  # fmt: skip

#: Labels for the class-conditional DiT (comma-separated synonyms, as ImageNet's id2label).
DIT_ID2LABEL = {
    0: "cat, kitty", 1: "dog", 2: "car", 3: "tree", 4: "house",
    5: "rocket", 6: "astronaut", 7: "sea", 8: "bus", 9: "grass",
}  # fmt: skip


def _tiny_t5(tok, seed: int, umt5: bool = False):
    """A 2-layer T5 v1.1-style (or UMT5) encoder sized to ``tok``."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = cfg_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.pad_token_id, **_T5)  # fmt: skip
    with _seeded(seed):
        return model_cls(config).eval()


def _tiny_vae_2d(seed: int):
    """``AutoencoderKL`` with 2 blocks (16, 32 channels): scale factor 2, 4 latent channels."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(16, 32), sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )  # fmt: skip


def _finish_pipe(pipe, device, dtype):
    """Eval mode everywhere (a directly constructed ``ModelMixin`` is in train mode, so DiT's
    label dropout would be live), silent progress bar, optional move/cast."""
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    if torch.device(device) != torch.device("cpu") or dtype != torch.float32:
        pipe.to(device=device, dtype=dtype)
    return pipe


def tiny_dit_pipeline(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **transformer_config: Any,
):
    """Class-conditional ``DiTPipeline``: ``DiTTransformer2DModel`` (6 layers, 4 heads x 16,
    32x32x4 latent, patch 2 -> 16x16 = 256 tokens, learned sigma), ``AutoencoderKL`` with scale
    factor 2 (64x64 images), ``DDIMScheduler``; ``id2label`` = `DIT_ID2LABEL` (saved in
    model_index.json) so ``pipe.get_label_ids(["dog"])`` works. The null class is 1000, so
    ``num_embeds_ada_norm`` stays 1000. ``transformer_config`` overrides the transformer config.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    cfg = dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=6,
        sample_size=32, patch_size=2, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )  # fmt: skip
    with _seeded(seed):
        transformer = DiTTransformer2DModel(**{**cfg, **transformer_config})
    vae = _tiny_vae_2d(seed + 1)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, num_train_timesteps=1000)
    id2label = dict(DIT_ID2LABEL)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # not registered by DiTPipeline itself
    return _finish_pipe(pipe, device, dtype)


def tiny_pixart_pipeline(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **transformer_config: Any,
):
    """``PixArtAlphaPipeline``: ``PixArtTransformer2DModel`` (4 layers, 4 heads x 16, 32x32x4
    latent, patch 2 -> 256 tokens, cross-attention to a 2-layer ``T5EncoderModel`` d_model 32),
    offline T5-style tokenizer, ``AutoencoderKL`` (scale 2, 64x64 images),
    ``DPMSolverMultistepScheduler``. Call with ``use_resolution_binning=False``.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tok = tiny_tokenizer("t5")
    text_encoder = _tiny_t5(tok, seed + 2)
    cfg = dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=32, patch_size=2, cross_attention_dim=64, caption_channels=_T5["d_model"],
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(**{**cfg, **transformer_config})
    vae = _tiny_vae_2d(seed + 1)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    pipe = PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish_pipe(pipe, device, dtype)


#: The tiny ``WanTransformer3DModel``'s config (``tiny_wan_pipeline``), readable without building it.
TINY_WAN_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16,
    out_channels=16, text_dim=_T5["d_model"], freq_dim=32, ffn_dim=128, num_layers=4,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip


def tiny_wan_pipeline(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **transformer_config: Any,
):
    """Wan 2.1 T2V-shaped ``WanPipeline``: ``WanTransformer3DModel`` (4 layers, 4 heads x 16,
    patch (1, 2, 2), 16 latent channels), 2-layer ``UMT5EncoderModel``, offline T5-style
    tokenizer, ``AutoencoderKLWan(base_dim=3, z_dim=16)`` (spatial 8x, temporal 4x),
    ``UniPCMultistepScheduler`` with flow sigmas (shift 3) as the real checkpoint.
    64x96 px, 9 frames -> latent (16, 3, 8, 12) -> 3 x 4 x 6 = 72 video tokens.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tok = tiny_tokenizer("t5")
    text_encoder = _tiny_t5(tok, seed + 2, umt5=True)
    with _seeded(seed):
        transformer = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, **transformer_config})
    with _seeded(seed + 1):
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    pipe = WanPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish_pipe(pipe, device, dtype)


#: Wan 2.2 A14B's expert switch (``boundary_ratio`` of the real Diffusers checkpoints): T2V, I2V
WAN22_BOUNDARY_RATIO = {"t2v": 0.875, "i2v": 0.9}


def _tiny_wan_vae(seed: int, **config: Any):
    from diffusers import AutoencoderKLWan

    base = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    with _seeded(seed):
        return AutoencoderKLWan(**{**base, **config})


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )


def tiny_wan22_pipeline(
    seed: int = 0,
    *,
    task: str = "t2v",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **transformer_config: Any,
):
    """Wan 2.2 A14B-shaped pipeline with both experts: ``transformer`` (high noise) and
    ``transformer_2`` (low noise, other weights, same config) switched at ``boundary_ratio``
    (`WAN22_BOUNDARY_RATIO`: 0.875 for T2V, 0.9 for I2V, as the real checkpoints).

    ``task="t2v"``: ``WanPipeline``, 16 latent channels (the tiny Wan 2.1 config of
    `tiny_wan_pipeline`). ``task="i2v"``: ``WanImageToVideoPipeline`` without an image encoder,
    the image conditioning concatenated as channels (``in_channels=36``) as Wan 2.2 I2V A14B;
    call with ``image=tiny_image(64, 96)``. Same text encoder, VAE and scheduler as
    `tiny_wan_pipeline`.
    """
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    if task not in WAN22_BOUNDARY_RATIO:
        raise ValueError(f"task must be one of {tuple(WAN22_BOUNDARY_RATIO)}, got {task!r}")
    tok = tiny_tokenizer("t5")
    text_encoder = _tiny_t5(tok, seed + 2, umt5=True)
    cfg = {**TINY_WAN_TRANSFORMER, **({"in_channels": 36} if task == "i2v" else {}), **transformer_config}
    experts = []
    for offset in (0, 3):
        with _seeded(seed + offset):
            experts.append(WanTransformer3DModel(**cfg))
    cls = WanPipeline if task == "t2v" else WanImageToVideoPipeline
    pipe = cls(
        tokenizer=tok, text_encoder=text_encoder, vae=_tiny_wan_vae(seed + 1), transformer=experts[0],
        transformer_2=experts[1], scheduler=_wan_scheduler(), boundary_ratio=WAN22_BOUNDARY_RATIO[task],
    )  # fmt: skip
    return _finish_pipe(pipe, device, dtype)


#: The TI2V-5B transformer config of the real checkpoint (``Wan-AI/Wan2.2-TI2V-5B-Diffusers``),
#: readable without building it: 48 latent channels, 24 heads x 128, 30 layers.
WAN22_TI2V_5B_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip


def tiny_wan22_ti2v_pipeline(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **transformer_config: Any,
):
    """Wan 2.2 TI2V-5B-shaped ``WanPipeline`` (one transformer, ``expand_timesteps=True``: the
    timestep is given per token): `WAN22_TI2V_5B_TRANSFORMER` shrunk to 4 layers of 4 heads x 16
    with its 48 latent channels, and the residual ``AutoencoderKLWan`` layout of the real VAE
    (``is_residual``, pixel patch 2: spatial 16x, temporal 4x, ``z_dim=48``).
    128x192 px, 9 frames -> latent (48, 3, 8, 12) -> 3 x 4 x 6 = 72 video tokens.
    """
    from diffusers import WanPipeline, WanTransformer3DModel

    tok = tiny_tokenizer("t5")
    text_encoder = _tiny_t5(tok, seed + 2, umt5=True)
    cfg = {**TINY_WAN_TRANSFORMER, "in_channels": 48, "out_channels": 48, **transformer_config}
    with _seeded(seed):
        transformer = WanTransformer3DModel(**cfg)
    vae = _tiny_wan_vae(
        seed + 1, base_dim=4, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
    )  # fmt: skip
    pipe = WanPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=_wan_scheduler(),
        expand_timesteps=True,
    )  # fmt: skip
    return _finish_pipe(pipe, device, dtype)


def tiny_cogvideox_pipeline(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **transformer_config: Any,
):
    """CogVideoX-2b-shaped ``CogVideoXPipeline``: ``CogVideoXTransformer3DModel`` (4 layers,
    4 heads x 16, sin-cos 3-D positions, 32 text tokens), 2-layer ``T5EncoderModel``,
    ``AutoencoderKLCogVideoX`` (4 blocks of 8 channels: spatial 8x, temporal 4x, 4 latent
    channels), ``CogVideoXDDIMScheduler`` (v-prediction, zero-SNR, trailing, as the real 2b).
    Call with ``max_sequence_length=32`` (= ``max_text_seq_length``).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tok = tiny_tokenizer("t5")
    text_encoder = _tiny_t5(tok, seed + 2)
    cfg = dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=_T5["d_model"], num_layers=4, sample_height=8, sample_width=12, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=32,
    )  # fmt: skip
    with _seeded(seed):
        transformer = CogVideoXTransformer3DModel(**{**cfg, **transformer_config})
    with _seeded(seed + 1):
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=3.0, timestep_spacing="trailing",
    )  # fmt: skip
    pipe = CogVideoXPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish_pipe(pipe, device, dtype)


#: ``FluxTransformer2DModel``'s config in FLUX.1-dev, readable without building it: 19 dual-stream and
#: 38 single-stream blocks of 24 heads x 128, 2-D RoPE axes (16, 56, 56) over (-, row, column).
FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip

#: ``HunyuanVideoTransformer3DModel``'s config in HunyuanVideo (``hunyuanvideo-community/HunyuanVideo``):
#: 20 dual-stream and 40 single-stream blocks of 24 heads x 128, 3-D RoPE axes (16, 56, 56).
HUNYUAN_VIDEO_TRANSFORMER: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)  # fmt: skip


def tiny_flux_transformer(seed: int = 0, **config: Any):
    """``FluxTransformer2DModel`` from `FLUX_DEV_TRANSFORMER` shrunk: 2 dual-stream + 2 single-stream
    blocks of 4 heads x 16, RoPE axes (4, 6, 6), 16 packed latent channels (4 x 2x2), text width 32.
    Inputs: `tiny_flux_inputs`."""
    from diffusers import FluxTransformer2DModel

    tiny = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
    with _seeded(seed):
        return FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **tiny, **config}).eval()


def tiny_flux_inputs(
    transformer, rows: int = 8, cols: int = 12, text_len: int = 8, timestep: float = 0.5, seed: int = 0
) -> dict[str, Any]:
    """Random inputs of a `tiny_flux_transformer` forward for a ``rows x cols`` image token grid,
    with ``img_ids`` / ``txt_ids`` as ``FluxPipeline`` makes them (``timestep`` in [0, 1])."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return dict(
        hidden_states=torch.randn(1, rows * cols, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([timestep]), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3),
        guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None, return_dict=False,
    )  # fmt: skip


def tiny_hunyuan_video_transformer(seed: int = 0, **config: Any):
    """``HunyuanVideoTransformer3DModel`` from `HUNYUAN_VIDEO_TRANSFORMER` shrunk: 2 dual-stream + 2
    single-stream blocks of 4 heads x 16, one refiner layer, RoPE axes (4, 6, 6), text width 32.
    Inputs: `tiny_hunyuan_video_inputs`."""
    from diffusers import HunyuanVideoTransformer3DModel

    tiny = dict(num_attention_heads=4, attention_head_dim=16, num_layers=2, num_single_layers=2,
                num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))  # fmt: skip
    with _seeded(seed):
        return HunyuanVideoTransformer3DModel(**{**HUNYUAN_VIDEO_TRANSFORMER, **tiny, **config}).eval()


def tiny_hunyuan_video_inputs(
    transformer, shape: tuple[int, int, int] = (3, 8, 12), text_len: int = 8, valid_text: int | None = None,
    timestep: float = 500.0, seed: int = 0,
) -> dict[str, Any]:
    """Random inputs of a `tiny_hunyuan_video_transformer` forward for latents of ``(frames, height,
    width)``; the text mask keeps the first ``valid_text`` tokens (default all), as the pipeline pads."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, text_len, dtype=torch.long)
    mask[:, : text_len if valid_text is None else valid_text] = 1
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, *shape, generator=g), timestep=torch.tensor([timestep]),
        encoder_hidden_states=torch.randn(1, text_len, cfg.text_embed_dim, generator=g), encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        guidance=torch.tensor([6000.0]) if cfg.guidance_embeds else None, return_dict=False,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Registry, recommended call kwargs, save / load
# --------------------------------------------------------------------------------------------

TINY_BUILDERS: dict[str, Callable[..., Any]] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "dit": tiny_dit_pipeline,
    "pixart": tiny_pixart_pipeline,
    "wan": tiny_wan_pipeline,
    "cogvideox": tiny_cogvideox_pipeline,
    "wan22": tiny_wan22_pipeline,
    "wan22_ti2v": tiny_wan22_ti2v_pipeline,
}

_VLM_PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
_VIDEO_PROMPT = "a red car on a street, the sky is blue"

#: Recommended smoke-run kwargs. Pipelines: ``pipe(**TINY_CALL_KWARGS[name], generator=...)``
#: (or `call_kwargs`). VLMs: ``text`` (and an image of ``image_size`` = (height, width)) go to
#: the processor, the rest to ``model.generate``.
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "llava": dict(text=_VLM_PROMPT, image_size=(64, 64), max_new_tokens=4, do_sample=False),
    "llava_next": dict(text=_VLM_PROMPT, image_size=(64, 128), max_new_tokens=4, do_sample=False),
    "dit": dict(class_labels=[1, 5], num_inference_steps=2, guidance_scale=4.0, output_type="np"),
    "pixart": dict(
        prompt="a small cat sitting on grass", height=64, width=64, num_inference_steps=2, guidance_scale=4.5,
        max_sequence_length=32, use_resolution_binning=False, clean_caption=False, output_type="np",
    ),
    "wan": dict(
        prompt=_VIDEO_PROMPT, negative_prompt="", height=64, width=96, num_frames=9, num_inference_steps=2,
        guidance_scale=5.0, max_sequence_length=32, output_type="np",
    ),
    "cogvideox": dict(
        prompt=_VIDEO_PROMPT, height=64, width=96, num_frames=9, num_inference_steps=2, guidance_scale=6.0,
        max_sequence_length=32, output_type="np",
    ),
    # 4 steps of UniPC (flow shift 3): timesteps 999, 900, 750, 500; the first two are the
    # high-noise expert's at both boundaries (T2V 875, I2V 900), the last two the low-noise one's.
    # (The I2V variant, tiny_wan22_pipeline(task="i2v"), is not in this registry: diffusers 0.42's
    # WanImageToVideoPipeline cleans prompts with ftfy without checking that it is installed, so
    # without ftfy it must be called with prompt_embeds, which plain kwargs cannot hold.)
    "wan22": dict(
        prompt=_VIDEO_PROMPT, negative_prompt="", height=64, width=96, num_frames=9, num_inference_steps=4,
        guidance_scale=5.0, max_sequence_length=32, output_type="np",
    ),
    "wan22_ti2v": dict(
        prompt=_VIDEO_PROMPT, negative_prompt="", height=128, width=192, num_frames=9, num_inference_steps=2,
        guidance_scale=5.0, max_sequence_length=32, output_type="np",
    ),
}  # fmt: skip


def call_kwargs(name: str, seed: int = 0) -> dict[str, Any]:
    """A fresh copy of ``TINY_CALL_KWARGS[name]``, with a seeded CPU ``generator`` for pipelines."""
    kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_CALL_KWARGS[name].items()}
    if name not in ("llava", "llava_next"):
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    return kwargs


def save_tiny(name: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``TINY_BUILDERS[name]`` and ``save_pretrained`` it (model + processor, or the whole
    pipeline) into ``path``; returns the folder, ready for `load_tiny` / ``from_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    built = TINY_BUILDERS[name](seed)
    if isinstance(built, TinyVLM):
        built.model.save_pretrained(path)
        built.processor.save_pretrained(path)
    else:
        built.save_pretrained(path)
    return path


def load_tiny(
    name: str, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Reload a folder written by `save_tiny` with the real classes' ``from_pretrained``."""
    if name in ("llava", "llava_next"):
        import transformers
        from transformers import AutoProcessor

        cls = getattr(transformers, {"llava": "LlavaForConditionalGeneration",
                                     "llava_next": "LlavaNextForConditionalGeneration"}[name])  # fmt: skip
        model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
        return TinyVLM(model, AutoProcessor.from_pretrained(path))
    import diffusers

    cls = getattr(diffusers, {"dit": "DiTPipeline", "pixart": "PixArtAlphaPipeline", "wan": "WanPipeline",
                              "cogvideox": "CogVideoXPipeline", "wan22": "WanPipeline",
                              "wan22_ti2v": "WanPipeline"}[name])  # fmt: skip
    return _finish_pipe(cls.from_pretrained(path), device, dtype)
