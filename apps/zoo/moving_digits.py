"""Moving digits: a tiny text-to-video Wan 2.1 (``diffusers.WanPipeline``) trained on this CPU.

Videos are 17 frames of 64x64 px: one scikit-learn digit (a 24 px sprite from the training
split) centred in frame 0, sliding over a black background by 2 px per frame in one of four
directions, wrapping around the borders (so longer videos keep a meaning), prompted as
``"digit 3 moving left"``.
The script trains an ``AutoencoderKLWan`` (4x spatial, 4x temporal, 8 latent channels), then a
``WanTransformer3DModel`` with Wan's flow-matching objective (Esser et al. 2024, rectified
flow: ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``) on the frozen VAE's latents, conditioned
by a frozen, randomly initialised 2-layer ``UMT5EncoderModel``. Generated videos are scored by
the zoo's digit classifier on the sprite (found per frame by its circular centre of mass) and
by the motion measured with circular cross-correlation between consecutive frames.
"""

from __future__ import annotations

import math
import string
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "NAME",
    "DIRECTIONS",
    "NUM_FRAMES",
    "SIZE",
    "SPEED",
    "NUM_INFERENCE_STEPS",
    "GUIDANCE_SCALE",
    "prompt_for",
    "moving_digit_videos",
    "build_tokenizer",
    "build_pipeline",
    "measure_motion",
    "classify_videos",
    "generate",
    "evaluate",
    "train",
    "load",
]

NAME = "moving-digits"
DIRECTIONS = ("left", "right", "up", "down")
#: (dy, dx) per frame, in units of SPEED pixels (image rows grow downwards).
_VELOCITY = torch.tensor([[0, -1], [0, 1], [-1, 0], [1, 0]])
SIZE = 64  # frame height and width (px)
SPRITE = 24  # digit sprite size (px)
NUM_FRAMES = 17  # 1 + 4k frames -> 5 latent frames
SPEED = 2  # px per frame
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 4.0
_NUMBERS = "zero one two three four five six seven eight nine".split()
_WORDS = ["digit", "moving", *DIRECTIONS, *_NUMBERS]

# Training recipe (the defaults of `train`; nothing else changes the committed weights).
_VAE = dict(base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
            scale_factor_spatial=4, scale_factor_temporal=4)  # fmt: skip
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
           relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)  # fmt: skip
_TRANSFORMER = dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=8,
                    out_channels=8, text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # fmt: skip
_FLOW_SHIFT = 2.0
#: VAE: (steps, canvas px, frames, batch) per phase; 32 px canvases first (the sprite fills half the
#: frame, which gets the VAE past predicting black quickly), then full frames with 2 temporal chunks.
_VAE_PHASES = ((400, 32, 5, 8), (100, SIZE, 9, 4))
_VAE_LR, _VAE_KL = 2e-3, 1e-4
_NUM_LATENT_VIDEOS = 1200
_DIT_STEPS, _DIT_BATCH, _DIT_LR, _TEXT_DROPOUT, _EMA = 3000, 16, 1e-3, 0.1, 0.998
_TEXT_KEEP = 8  # text positions kept in training (see `_compact_text`)


def prompt_for(digit: int, direction: str) -> str:
    """The training prompt for ``digit`` (0..9) moving in ``direction`` (one of `DIRECTIONS`)."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return f"digit {digit} moving {direction}"


def moving_digit_videos(
    glyphs: torch.Tensor,
    directions: torch.Tensor,
    offsets: torch.Tensor,
    *,
    num_frames: int = NUM_FRAMES,
    size: int = SIZE,
    speed: int = SPEED,
) -> torch.Tensor:
    """Videos ``[N, num_frames, size, size]`` in [0, 1]: sprite ``glyphs[n]`` ``[N, 1, s, s]`` with its
    top-left corner at ``offsets[n]`` (y, x) in frame 0, moving ``speed`` px per frame in
    ``DIRECTIONS[directions[n]]``, wrapping around the borders."""
    if not isinstance(glyphs, torch.Tensor) or glyphs.ndim != 4 or glyphs.shape[1] != 1:
        raise ValueError(f"glyphs must be a [N, 1, s, s] tensor, got {getattr(glyphs, 'shape', glyphs)!r}")
    n, s = glyphs.shape[0], glyphs.shape[-1]
    if s > size:
        raise ValueError(f"glyphs ({s} px) must not exceed size ({size} px)")
    if directions.shape != (n,) or offsets.shape != (n, 2):
        raise ValueError(f"directions must be [{n}] and offsets [{n}, 2], got {tuple(directions.shape)}, "
                         f"{tuple(offsets.shape)}")  # fmt: skip
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    canvas = glyphs.new_zeros(n, size, size)
    canvas[:, :s, :s] = glyphs[:, 0]
    t = torch.arange(num_frames)
    vel = _VELOCITY[directions.long()] * speed
    shift_y = offsets[:, 0, None] + vel[:, 0, None] * t  # [N, F]
    shift_x = offsets[:, 1, None] + vel[:, 1, None] * t
    grid = torch.arange(size)
    ys = (grid[None, None, :] - shift_y[:, :, None]) % size  # [N, F, size]
    xs = (grid[None, None, :] - shift_x[:, :, None]) % size
    return canvas[torch.arange(n)[:, None, None, None], ys[:, :, :, None], xs[:, :, None, :]]


def _random_videos(
    glyphs: torch.Tensor, labels: torch.Tensor, count: int, gen: torch.Generator, num_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` videos of random glyphs and directions, the sprite centred in frame 0:
    (videos, digits, directions)."""
    idx = torch.randint(len(glyphs), (count,), generator=gen)
    directions = torch.randint(len(DIRECTIONS), (count,), generator=gen)
    offsets = torch.full((count, 2), (SIZE - SPRITE) // 2)
    return (
        moving_digit_videos(glyphs[idx], directions, offsets, num_frames=num_frames),
        labels[idx],
        directions,
    )


def _to_vae(videos: torch.Tensor) -> torch.Tensor:
    """``[N, F, H, W]`` in [0, 1] -> VAE input ``[N, 3, F, H, W]`` in [-1, 1] (grey RGB)."""
    return (videos * 2 - 1)[:, None].expand(-1, 3, -1, -1, -1).contiguous()


def build_tokenizer():
    """Offline Unigram tokenizer (T5 specials ``<pad>``=0, ``</s>``=1, ``<unk>``=2): the prompt words
    as whole pieces, single characters for anything else; round-trips through ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("▁", -2.0)] + [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )
    tok.model_max_length = 512
    return tok


def build_pipeline(seed: int = 0):
    """The untrained ``WanPipeline`` (seeded init): UMT5 text encoder, Wan VAE, Wan transformer,
    ``UniPCMultistepScheduler`` with flow sigmas (shift `_FLOW_SHIFT`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = UMT5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            decoder_start_token_id=tok.pad_token_id, **_T5)  # fmt: skip
        text_encoder = UMT5EncoderModel(config)
        z = _VAE["z_dim"]
        vae = AutoencoderKLWan(**_VAE, latents_mean=[0.0] * z, latents_std=[1.0] * z)
        transformer = WanTransformer3DModel(**_TRANSFORMER)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=_FLOW_SHIFT,
        num_train_timesteps=1000,
    )
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _eval_mode(pipe):
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def load(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """``WanPipeline.from_pretrained`` of the committed model (or ``path``), in eval mode."""
    from diffusers import WanPipeline

    from mmaccel.apps.zoo import zoo_path

    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str, Path or None, got {type(path).__name__}")
    pipe = WanPipeline.from_pretrained(str(zoo_path(NAME) if path is None else path), dtype=dtype)
    return _eval_mode(pipe.to(device))


# --------------------------------------------------------------------------------------------
# Measuring videos
# --------------------------------------------------------------------------------------------


def _check_videos(videos: torch.Tensor) -> None:
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
    if videos.ndim != 4 or videos.shape[1] < 2 or videos.shape[2] < SPRITE or videos.shape[3] < SPRITE:
        raise ValueError(f"videos must be [N, F >= 2, H, W] grey frames in [0, 1], got {tuple(videos.shape)}")


def measure_motion(videos: torch.Tensor) -> torch.Tensor:
    """Mean velocity ``[N, 2]`` (dy, dx px per frame) of grey ``videos`` ``[N, F, H, W]``: the peak of
    the circular cross-correlation of each pair of consecutive frames, averaged over pairs."""
    _check_videos(videos)
    h, w = videos.shape[-2:]
    spec = torch.fft.rfft2(videos.float() - videos.float().mean((-2, -1), keepdim=True))
    corr = torch.fft.irfft2(spec[:, 1:] * spec[:, :-1].conj(), s=(h, w))  # [N, F-1, H, W]
    peak = corr.flatten(2).argmax(-1)
    dy, dx = peak // w, peak % w
    dy = (dy + h // 2) % h - h // 2  # wrap to [-h/2, h/2)
    dx = (dx + w // 2) % w - w // 2
    return torch.stack([dy, dx], -1).float().mean(1)


def _sprite_crops(videos: torch.Tensor) -> torch.Tensor:
    """Per frame, the ``SPRITE`` window around the circular centre of mass, resized to 32x32:
    ``[N * F, 1, 32, 32]`` for the digit classifier."""
    n, f, h, w = videos.shape
    frames = videos.reshape(n * f, h, w).float().clamp(0, 1)
    weight = (frames - 0.1).clamp(min=0) + 1e-6

    def centre(mass: torch.Tensor, length: int) -> torch.Tensor:
        angle = torch.arange(length) * (2 * math.pi / length)
        mean = torch.atan2((mass * angle.sin()).sum(-1), (mass * angle.cos()).sum(-1))
        return (mean % (2 * math.pi) * length / (2 * math.pi)).round().long()

    cy, cx = centre(weight.sum(2), h), centre(weight.sum(1), w)
    rows = (cy[:, None] - SPRITE // 2 + torch.arange(SPRITE)) % h  # [NF, SPRITE]
    cols = (cx[:, None] - SPRITE // 2 + torch.arange(SPRITE)) % w
    crops = frames[torch.arange(n * f)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return F.interpolate(crops[:, None], size=(32, 32), mode="bilinear", align_corners=False)


@torch.no_grad()
def classify_videos(videos: torch.Tensor, classifier: Any | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit ``[N]``, direction index ``[N]``) of grey ``videos`` ``[N, F, H, W]`` in [0, 1]: the zoo
    digit classifier's log-probabilities summed over the frames' sprite crops, and the direction
    closest to the measured motion."""
    from mmaccel.apps.zoo.digits import load_digit_classifier

    _check_videos(videos)
    clf = load_digit_classifier() if classifier is None else classifier
    n, f = videos.shape[:2]
    logp = torch.cat([clf(c).log_softmax(-1) for c in _sprite_crops(videos).split(512)])
    digits = logp.reshape(n, f, 10).sum(1).argmax(-1)
    directions = (measure_motion(videos) @ _VELOCITY.float().T).argmax(-1)
    return digits, directions


def _grey(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pipeline output ``[N, F, H, W, 3]`` in [0, 1] -> grey ``[N, F, H, W]``."""
    return torch.as_tensor(np.asarray(frames)).float().mean(-1)


@torch.no_grad()
def generate(
    pipe: Any,
    digits: list[int],
    directions: list[str],
    *,
    seed: int = 0,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    num_frames: int = NUM_FRAMES,
) -> torch.Tensor:
    """Grey videos ``[N, num_frames, 64, 64]`` in [0, 1] for the prompts of ``digits`` x ``directions``
    (paired element-wise), one seeded generator for the batch."""
    if len(digits) != len(directions) or not digits:
        raise ValueError(f"digits and directions must be non-empty and of equal length, got {len(digits)}, "
                         f"{len(directions)}")  # fmt: skip
    prompts = [prompt_for(d, r) for d, r in zip(digits, directions)]
    out = pipe(
        prompt=prompts, height=SIZE, width=SIZE, num_frames=num_frames, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="np",
    )  # fmt: skip
    return _grey(out.frames)


def _all_prompts() -> tuple[list[int], list[str]]:
    pairs = [(d, r) for d in range(10) for r in DIRECTIONS]
    return [d for d, _ in pairs], [r for _, r in pairs]


@torch.no_grad()
def vae_psnr(pipe: Any, videos: torch.Tensor) -> float:
    """PSNR (dB, [0, 1] range) of the VAE's reconstruction (posterior mean) of grey ``videos``."""
    from mmaccel.runtime.metrics import psnr

    _check_videos(videos)
    vae = pipe.vae
    x = _to_vae(videos).to(vae.dtype)
    rec = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(8)])
    return psnr((rec.float().clamp(-1, 1) + 1) / 2, (x.float() + 1) / 2, data_range=1.0)


def _test_videos(count: int = 80, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real videos of held-out digits (test split), every direction equally often."""
    from mmaccel.apps.zoo.digits import digit_images, digit_split

    images, labels = digit_images(SPRITE)
    _, test_idx = digit_split()
    gen = torch.Generator().manual_seed(seed)
    idx = test_idx[torch.randperm(len(test_idx), generator=gen)[:count]]
    directions = torch.arange(count) % len(DIRECTIONS)
    offsets = torch.randint(SIZE, (count, 2), generator=gen)
    return moving_digit_videos(images[idx], directions, offsets), labels[idx], directions


def evaluate(
    pipe: Any,
    *,
    seed: int = 0,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    classifier: Any | None = None,
) -> dict[str, float | int]:
    """Quality of ``pipe``: 40 generated videos (every digit x direction prompt once) scored by
    `classify_videos`, the same scores on 80 real held-out videos (the scorer's ceiling), and
    the VAE's reconstruction PSNR on those real videos."""
    from mmaccel.apps.zoo.digits import load_digit_classifier

    clf = load_digit_classifier() if classifier is None else classifier
    digits, directions = _all_prompts()
    videos = generate(pipe, digits, directions, seed=seed, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale)  # fmt: skip
    pred_d, pred_r = classify_videos(videos, clf)
    ok_d = pred_d == torch.tensor(digits)
    ok_r = pred_r == torch.tensor([DIRECTIONS.index(r) for r in directions])
    speed = measure_motion(videos).norm(dim=-1)
    real, real_digits, real_dirs = _test_videos()
    real_d, real_r = classify_videos(real, clf)
    return {
        "generated digit accuracy (40 videos)": ok_d.float().mean().item(),
        "generated direction accuracy (40 videos)": ok_r.float().mean().item(),
        "generated both correct": (ok_d & ok_r).float().mean().item(),
        "generated mean speed px/frame (target 2)": speed.mean().item(),
        "real held-out digit accuracy (scorer ceiling, 80 videos)": (real_d == real_digits)
        .double()
        .mean()
        .item(),
        "real held-out direction accuracy": (real_r == real_dirs).double().mean().item(),
        "VAE reconstruction PSNR dB (80 held-out videos)": vae_psnr(pipe, real),
        "inference steps": num_inference_steps,
        "guidance scale": guidance_scale,
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _train_vae(vae: Any, glyphs: torch.Tensor, gen: torch.Generator, progress: bool) -> float:
    """Reconstruction (MSE in [-1, 1]) + `_VAE_KL` x KL per pixel, phases `_VAE_PHASES`, one-cycle
    lr. Returns the last reconstruction loss."""
    total_steps = sum(p[0] for p in _VAE_PHASES)
    opt = torch.optim.AdamW(vae.parameters(), lr=_VAE_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, _VAE_LR, total_steps=total_steps, pct_start=0.05)
    vae.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(total=total_steps, desc="train VAE", disable=not progress)
    for steps, size, frames, batch in _VAE_PHASES:
        for _ in range(steps):
            idx = torch.randint(len(glyphs), (batch,), generator=gen)
            directions = torch.randint(len(DIRECTIONS), (batch,), generator=gen)
            offsets = torch.randint(size, (batch, 2), generator=gen)
            x = _to_vae(moving_digit_videos(glyphs[idx], directions, offsets, num_frames=frames, size=size))
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=gen)).sample
            loss = F.mse_loss(rec, x)
            total = loss + _VAE_KL * posterior.kl().mean() / x[0].numel()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    vae.eval().requires_grad_(False)
    return loss.item()


@torch.no_grad()
def _encode_dataset(
    vae: Any, glyphs: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means ``[N, z, 5, 16, 16]`` of `_NUM_LATENT_VIDEOS` random training videos and
    their prompt index ``digit * 4 + direction``."""
    videos, digits, directions = _random_videos(glyphs, labels, _NUM_LATENT_VIDEOS, gen, NUM_FRAMES)
    chunks = [vae.encode(_to_vae(v)).latent_dist.mode()
              for v in tqdm(videos.split(16), desc="encode videos", disable=not progress)]  # fmt: skip
    return torch.cat(chunks), digits * len(DIRECTIONS) + directions


def _compact_text(embeds: torch.Tensor, keep: int = _TEXT_KEEP) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``keep`` positions of zero-padded prompt embeddings ``[B, L, D]`` and an additive
    cross-attention bias ``[B, 1, 1, keep]``: 0 on real tokens, ``log(padding in L / padding kept)``
    on kept padding. The pipeline pads with zeros, so all padding keys and values are equal and
    this attention is exactly the full-length one, at a fraction of the cost (training only)."""
    real = embeds[:, :keep].abs().sum(-1) > 0
    n_real = real.sum(-1, keepdim=True)
    if (n_real >= keep).any():
        raise ValueError(f"keep={keep} must exceed the longest prompt ({int(n_real.max())} tokens)")
    ratio = (embeds.shape[1] - n_real).float() / (keep - n_real).float()
    bias = torch.where(real, torch.zeros(()), ratio.log())
    return embeds[:, :keep], bias[:, None, None, :]


class _BiasedCrossAttnProcessor:
    """Wraps a Wan cross-attention processor to pass ``bias`` (set per step) as the attention mask."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def _train_transformer(
    transformer: Any,
    latents: torch.Tensor,
    prompt_idx: torch.Tensor,
    prompt_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    gen: torch.Generator,
    progress: bool,
) -> tuple[Any, float]:
    """Flow matching as Wan: ``s`` uniform then shifted by `_FLOW_SHIFT` (the sampler's schedule),
    ``x_s = (1 - s) x0 + s eps``, timestep ``1000 s``, MSE to ``eps - x0``; the prompt is replaced
    by the empty prompt with probability `_TEXT_DROPOUT` (for classifier-free guidance). The
    512-position text is attended through `_compact_text` (exact, cheaper). Returns
    the exponential moving average of the weights (decay `_EMA`) and the mean loss of the last 100
    steps."""
    import copy

    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=_DIT_LR, weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / _DIT_STEPS))
    )
    originals = [block.attn2.processor for block in transformer.blocks]
    wrappers = [_BiasedCrossAttnProcessor(p) for p in originals]
    for block, wrapper in zip(transformer.blocks, wrappers):
        block.attn2.set_processor(wrapper)
    prompt_embeds, prompt_bias = _compact_text(prompt_embeds)
    null_embeds, null_bias = _compact_text(null_embeds)
    transformer.train()
    losses = []
    for _ in tqdm(range(_DIT_STEPS), desc="train transformer", disable=not progress):
        idx = torch.randint(len(latents), (_DIT_BATCH,), generator=gen)
        x0 = latents[idx]
        u = torch.rand(_DIT_BATCH, generator=gen)
        s = _FLOW_SHIFT * u / (1 + (_FLOW_SHIFT - 1) * u)
        noise = torch.randn(x0.shape, generator=gen)
        sv = s.view(-1, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * noise
        drop = torch.rand(_DIT_BATCH, generator=gen) < _TEXT_DROPOUT
        text = torch.where(drop.view(-1, 1, 1), null_embeds, prompt_embeds[prompt_idx[idx]])
        bias = torch.where(drop.view(-1, 1, 1, 1), null_bias, prompt_bias[prompt_idx[idx]])
        for wrapper in wrappers:
            wrapper.bias = bias
        pred = transformer(xt, s * 1000, text, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - _EMA)
        losses.append(loss.item())
    for block, original in zip(transformer.blocks, originals):
        block.attn2.set_processor(original)
    transformer.eval().requires_grad_(False)
    return ema, sum(losses[-100:]) / len(losses[-100:])


def train(output: Path, *, seed: int = 0, progress: bool = True) -> dict[str, float | int | str]:
    """Train the VAE, then the transformer (text encoder frozen at its seeded init), save the
    ``WanPipeline`` to ``output`` with ``save_pretrained``, evaluate, write the model card."""
    from mmaccel.apps.zoo.card import write_model_card
    from mmaccel.apps.zoo.digits import digit_images, digit_split

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe = build_pipeline(seed)
    images, labels = digit_images(SPRITE)
    train_idx, _ = digit_split()
    glyphs, glyph_labels = images[train_idx], labels[train_idx]

    vae_loss = _train_vae(pipe.vae, glyphs, gen, progress)
    latents, prompt_idx = _encode_dataset(pipe.vae, glyphs, glyph_labels, gen, progress)
    dims = (0, 2, 3, 4)
    mean, std = latents.mean(dims), latents.std(dims)
    pipe.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    pipe.text_encoder.eval().requires_grad_(False)
    digits, directions = _all_prompts()
    with torch.no_grad():
        prompt_embeds, null_embeds = pipe.encode_prompt(
            [prompt_for(d, r) for d, r in zip(digits, directions)], negative_prompt="",
            do_classifier_free_guidance=True, device="cpu",
        )  # fmt: skip
    ema, dit_loss = _train_transformer(
        pipe.transformer, latents, prompt_idx, prompt_embeds, null_embeds[:1], gen, progress
    )
    pipe.transformer.load_state_dict(ema.state_dict())
    train_cpu = time.process_time() - cpu_start

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output)
    metrics: dict[str, float | int | str] = dict(evaluate(_eval_mode(pipe), seed=seed))
    metrics["VAE final train MSE ([-1, 1])"] = vae_loss
    metrics["transformer final train loss (mean of last 100 steps)"] = dit_loss
    metrics["training CPU seconds (excl. evaluation)"] = round(train_cpu, 1)
    metrics["parameters (transformer / VAE / text encoder)"] = " / ".join(
        str(sum(p.numel() for p in m.parameters())) for m in (pipe.transformer, pipe.vae, pipe.text_encoder)
    )
    write_model_card(
        output,
        name=NAME,
        summary=(
            "A tiny text-to-video Wan 2.1 (`diffusers.WanPipeline`) that draws one scikit-learn digit "
            f"sliding over a black {SIZE}x{SIZE} frame, {NUM_FRAMES} frames, for prompts such as "
            "`digit 3 moving left` (digits 0-9; left, right, up, down). It gives the sparse-attention "
            "and parallel-video benchmarks a video model whose attention was learned, and whose output "
            "can be checked: a digit classifier and a motion estimate score every generated video."
        ),
        architecture=(
            f"`WanTransformer3DModel` {_TRANSFORMER['num_layers']} blocks, {_TRANSFORMER['num_attention_heads']} "
            f"heads x {_TRANSFORMER['attention_head_dim']}, FFN {_TRANSFORMER['ffn_dim']}, patch (1, 4, 4): "
            "5 x 4 x 4 = 80 video tokens. `AutoencoderKLWan` base_dim 8, dim_mult [1, 2, 2], z_dim 8 "
            "(4x spatial, 4x temporal: 17 x 64 x 64 px -> 8 x 5 x 16 x 16). `UMT5EncoderModel` 2 layers, "
            "d_model 32, **left at its seeded random initialisation** (frozen; the transformer learns to "
            "read its outputs), with an offline Unigram tokenizer whose pieces are the prompt words plus "
            f"single characters. `UniPCMultistepScheduler` with flow sigmas, shift {_FLOW_SHIFT}."
        ),
        data=(
            "Drawn by the script: 24 px sprites of the 1,437 training digits of scikit-learn `load_digits` "
            "(`mmaccel.apps.zoo.digits.digit_split`), centred in frame 0 and moved 2 px per frame left, right, up "
            "or down with wrap-around. The VAE also sees random start positions. Evaluation uses the 360 "
            "held-out digits."
        ),
        training=(
            "VAE: AdamW (one-cycle lr " + str(_VAE_LR) + "), phases (steps, canvas px, frames, batch) "
            f"{list(_VAE_PHASES)}, MSE + {_VAE_KL} x KL per pixel. "
            f"Transformer: {_NUM_LATENT_VIDEOS} videos encoded once (posterior means, normalised per channel; "
            "the statistics are stored as the VAE's `latents_mean`/`latents_std`), "
            f"{_DIT_STEPS} AdamW steps (lr {_DIT_LR}, cosine), batch {_DIT_BATCH}, rectified-flow loss with "
            f"shifted-uniform noise levels, {_TEXT_DROPOUT:.0%} empty-prompt dropout, EMA {_EMA} (saved). The "
            "512-position zero-padded text is attended as its first 8 positions with a log-count bias on "
            "the padding keys, which is exact (equal padding keys) and much cheaper. "
            f"Defaults for sampling: {NUM_INFERENCE_STEPS} steps, guidance {GUIDANCE_SCALE}."
        ),
        metrics=metrics,
        seed=seed,
        train_seconds=time.perf_counter() - start,
        limitations=(
            "Knows exactly 40 prompts (10 digits x 4 directions) at 64x64 px; other text is read by a random "
            "encoder and gives arbitrary videos. Other sizes and frame counts are untrained (longer videos "
            "keep moving because the training motion wraps around). Quality is scored by a classifier "
            "trained on clean digits: see its ceiling on real videos in the table."
        ),
    )
    return metrics
