"""Digits DiT: a class-conditional latent DiT trained on scikit-learn digits, as a `DiTPipeline`.

A tiny ``AutoencoderKL`` (1-channel 32x32 digits -> 4 x 8 x 8 latents) and a
``DiTTransformer2DModel`` (Peebles & Xie, "Scalable Diffusion Models with Transformers",
arXiv:2212.09748) with patch size 1, so every forward sees a real 8x8 grid of 64 tokens for
token pooling and merging. Both are trained here from scratch on the 1,437 training digits of
`mmaccel.apps.zoo.digits.digit_split`; the folder loads with ``DiTPipeline.from_pretrained`` and
``pipe.get_label_ids(["three"])`` works. Sample quality is measured with the zoo's digit
classifier: accuracy on the requested classes and feature Frechet distance to the 360 test
digits.

    from mmaccel.apps.zoo import digits_dit
    pipe = digits_dit.load()
    images = pipe(pipe.get_label_ids(["three", "seven"]), **digits_dit.SAMPLING, output_type="pt").images
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmaccel.apps.zoo.digits import (
    classifier_accuracy,
    digit_images,
    digit_split,
    frechet_distance,
    load_digit_classifier,
)

__all__ = [
    "NAME",
    "ID2LABEL",
    "SAMPLING",
    "build_pipeline",
    "to_digits",
    "generate",
    "sample_metrics",
    "evaluate",
    "train",
    "load",
]

NAME = "digits-dit"
ID2LABEL = {i: w for i, w in enumerate("zero one two three four five six seven eight nine".split())}
#: Default sampling settings (DPM-Solver++ multistep), used by `evaluate` and the benchmarks.
SAMPLING: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 2.0}

_VAE_CONFIG = dict(
    in_channels=1, out_channels=1, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32, 64), sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)  # fmt: skip
_DIT_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=4, num_layers=6,
    sample_size=8, patch_size=1, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
)  # fmt: skip
# DiTPipeline feeds class 1000 as the unconditional label, so the label table keeps 1000 rows
# (+1 null) although only 0-9 are used.
_NULL_CLASS = 1000


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def build_pipeline(seed: int = 0):
    """An untrained ``DiTPipeline`` (eval mode) with this entry's configs, seeded.

    The DiT gets the paper's adaLN-Zero initialisation (modulation and output layers zeroed),
    which diffusers does not apply; the scheduler is DPM-Solver++ over DDPM's linear betas.
    """
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    _check_int("seed", seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**_VAE_CONFIG)
        transformer = DiTTransformer2DModel(**_DIT_CONFIG)
    zeroed = [block.norm1.linear for block in transformer.transformer_blocks]
    for layer in [*zeroed, transformer.proj_out_1, transformer.proj_out_2]:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler, id2label=ID2LABEL)
    pipe.register_to_config(id2label=ID2LABEL)  # DiTPipeline does not register it itself
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """Pipeline images (``[N, C, H, W]`` in [0, 1], or ``[N, H, W, C]`` numpy-style) as the
    classifier's ``[N, 1, 32, 32]``: channel mean, bilinear resize."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D, got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    images = images.float().mean(1, keepdim=True)
    if images.shape[-2:] != (32, 32):
        images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1)


@torch.no_grad()
def generate(
    pipe,
    class_labels: Sequence[int],
    *,
    num_inference_steps: int = SAMPLING["num_inference_steps"],
    guidance_scale: float = SAMPLING["guidance_scale"],
    seed: int = 0,
    batch_size: int = 100,
) -> torch.Tensor:
    """``[N, 1, 32, 32]`` samples in [0, 1]; sample ``i`` starts from the noise of seed ``seed + i``,
    so results do not depend on ``batch_size``."""
    labels = list(class_labels)
    if not labels or not all(isinstance(c, int) and 0 <= c < len(ID2LABEL) for c in labels):
        raise ValueError(f"class_labels must be a non-empty sequence of ints in [0, 9], got {class_labels!r}")
    _check_int("num_inference_steps", num_inference_steps, 1)
    _check_int("seed", seed, 0)
    _check_int("batch_size", batch_size, 1)
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, guidance_scale=guidance_scale, generator=gens,
                      num_inference_steps=num_inference_steps, output_type="pt").images  # fmt: skip
        out.append(to_digits(images.cpu()))
    return torch.cat(out)


def _floor(clf) -> float:
    """Classifier-feature FD between the real train and test digits (the floor for samples)."""
    images, _ = digit_images(32)
    train_idx, test_idx = digit_split()
    with torch.no_grad():
        return frechet_distance(clf.features(images[train_idx]), clf.features(images[test_idx]))


@torch.no_grad()
def sample_metrics(
    samples: torch.Tensor,
    labels: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    classifier=None,
) -> dict[str, float]:
    """Quality of ``[N, 1, 32, 32]`` digit samples: classifier accuracy on ``labels`` and
    classifier-feature Frechet distance to the 360 test digits; with ``reference`` (samples of
    the same noise from another model, e.g. the dense one) also PSNR and mean SSIM against it."""
    from skimage.metrics import structural_similarity

    from mmaccel.runtime.metrics import psnr

    clf = load_digit_classifier() if classifier is None else classifier
    images, _ = digit_images(32)
    out = {
        "sample accuracy": classifier_accuracy(clf, samples, labels),
        "sample FD vs test digits": frechet_distance(
            clf.features(samples), clf.features(images[digit_split()[1]])
        ),
    }
    if reference is not None:
        if reference.shape != samples.shape:
            raise ValueError(
                f"reference must have shape {tuple(samples.shape)}, got {tuple(reference.shape)}"
            )
        pairs = zip(samples[:, 0].numpy(), reference[:, 0].numpy(), strict=True)
        out["PSNR dB vs reference"] = psnr(samples, reference, data_range=1.0)
        out["SSIM vs reference"] = float(
            np.mean([structural_similarity(a, b, data_range=1.0) for a, b in pairs])
        )
    return out


def evaluate(
    pipe,
    *,
    samples_per_class: int = 20,
    seed: int = 0,
    classifier=None,
    **sampling: Any,
) -> dict[str, float]:
    """`sample_metrics` of ``10 * samples_per_class`` samples (``samples_per_class`` of each
    digit, sample ``i`` from seed ``seed + i``). ``sampling`` overrides `SAMPLING`
    (``num_inference_steps``, ``guidance_scale``)."""
    _check_int("samples_per_class", samples_per_class, 1)
    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise TypeError(f"unexpected sampling arguments {sorted(unknown)}; allowed: {sorted(SAMPLING)}")
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    samples = generate(pipe, labels.tolist(), seed=seed, **{**SAMPLING, **sampling})
    return sample_metrics(samples, labels, classifier=classifier)


def _train_vae(vae, x: torch.Tensor, steps: int, gen: torch.Generator, progress: bool) -> float:
    """Reconstruction (MSE) + small KL on ``x`` in [-1, 1]; returns the last step's MSE."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    mse = float("nan")
    for _ in tqdm(range(steps), desc="train VAE", disable=not progress):
        batch = x[torch.randint(len(x), (64,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.mse_loss(recon, batch)
        loss = rec + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        mse = rec.item()
    vae.eval()
    return mse


@torch.no_grad()
def _standardise_latents(vae, x: torch.Tensor) -> None:
    """Fold a per-channel affine into ``quant_conv`` / ``post_quant_conv`` so the posterior means
    of ``x`` have zero mean and unit variance per channel (``DiTPipeline`` only applies a scalar
    ``scaling_factor``, which is set to 1); decoding is unchanged up to rounding."""
    mean = vae.encode(x).latent_dist.mean
    mu, sd = mean.mean((0, 2, 3)), mean.std((0, 2, 3))
    c = len(mu)
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= sd[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - mu) / sd
    q.bias[c:] -= 2 * sd.log()  # log-variance of the scaled posterior
    pq.bias += pq.weight[:, :, 0, 0] @ mu
    pq.weight *= sd[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)


def _train_dit(
    transformer,
    mean: torch.Tensor,
    std: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    gen: torch.Generator,
    progress: bool,
) -> float:
    """Epsilon-prediction DDPM training on the latent posterior with 10% label dropout; the weights
    end as the EMA of the trained ones. Returns the mean loss of the last 10% of the steps."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    # Eval mode: dropout is 0, and the built-in label dropout would draw independently in every
    # block; the null label is set here instead, the same for all blocks.
    transformer.eval()
    losses = []
    for step in tqdm(range(steps), desc="train DiT", disable=not progress):
        idx = torch.randint(len(mean), (128,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        y = torch.where(torch.rand(len(idx), generator=gen) < 0.1, _NULL_CLASS, labels[idx])
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        pred = transformer(noise_sched.add_noise(z0, noise, t), timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
    transformer.load_state_dict(ema.state_dict())
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


def train(
    output: Path,
    *,
    seed: int = 0,
    progress: bool = True,
    vae_steps: int = 400,
    dit_steps: int = 800,
    eval_samples_per_class: int = 20,
) -> dict[str, float | int | str]:
    """Train the VAE, then the DiT on its latents, save the pipeline to ``output`` with a model
    card, and return the quality metrics. The defaults produce the committed weights."""
    from mmaccel.apps.zoo.card import write_model_card

    _check_int("seed", seed, 0)
    _check_int("vae_steps", vae_steps, 1)
    _check_int("dit_steps", dit_steps, 1)
    _check_int("eval_samples_per_class", eval_samples_per_class, 1)
    start = time.perf_counter()
    cpu_start = time.process_time()
    images, labels = digit_images(32)
    train_idx, test_idx = digit_split()
    x, y = images[train_idx] * 2 - 1, labels[train_idx]
    gen = torch.Generator().manual_seed(seed)
    pipe = build_pipeline(seed)
    vae_mse = _train_vae(pipe.vae, x, vae_steps, gen, progress)
    _standardise_latents(pipe.vae, x)
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist
    dit_loss = _train_dit(pipe.transformer, posterior.mean, posterior.std, y, dit_steps, gen, progress)
    train_cpu = time.process_time() - cpu_start
    test = images[test_idx]
    with torch.no_grad():
        recon = (pipe.vae.decode(pipe.vae.encode(test * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    clf = load_digit_classifier()
    metrics: dict[str, float | int | str] = {
        "VAE reconstruction PSNR dB (test digits)": float(10 * torch.log10(1 / F.mse_loss(recon, test))),
        "VAE reconstruction accuracy (test digits)": classifier_accuracy(clf, recon, labels[test_idx]),
        **evaluate(pipe, samples_per_class=eval_samples_per_class, seed=seed, classifier=clf),
        "real train vs test digits FD (floor)": _floor(clf),
        "sampling": f"DPM-Solver++ {SAMPLING['num_inference_steps']} steps, guidance {SAMPLING['guidance_scale']}",
        "samples": 10 * eval_samples_per_class,
        "final VAE MSE": vae_mse,
        "final DiT loss (last 10% of steps)": dit_loss,
        "DiT parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "VAE parameters": sum(p.numel() for p in pipe.vae.parameters()),
        "training CPU seconds": round(train_cpu, 1),
    }
    output = Path(output)
    pipe.save_pretrained(output, safe_serialization=True)
    d = _DIT_CONFIG
    write_model_card(
        output,
        name=NAME,
        summary="A class-conditional latent diffusion transformer that draws 32x32 grey digits, as a standard "
        '`diffusers.DiTPipeline` (`pipe.get_label_ids(["three"])`). mmaccel uses it for fidelity figures of '
        "its DiT plugins (token density, FlexDiT) on a model with learned attention.",
        architecture=f"`AutoencoderKL` (1 channel, blocks {_VAE_CONFIG['block_out_channels']}, 32x32 -> 4x8x8 latent, "
        "latents standardised per channel on the training digits, folded into its 1x1 quant convs, so "
        f"`scaling_factor` is 1); `DiTTransformer2DModel` ({d['num_layers']} blocks, "
        f"{d['num_attention_heads']} heads x {d['attention_head_dim']}, patch 1 -> 8x8 = 64 tokens, adaLN-Zero, "
        "epsilon prediction, no learned sigma); `DPMSolverMultistepScheduler` over DDPM linear betas (1000 steps). "
        "Class 1000 is the null label for classifier-free guidance, as in DiT.",
        data="scikit-learn `load_digits` (1,797 8x8 images) bilinearly upsampled to 32x32 "
        "(`mmaccel.apps.zoo.digits.digit_images`); the 1,437 training digits of `digit_split()`, no augmentation.",
        training=f"VAE: {vae_steps} AdamW steps, batch 64, lr 2e-3 one-cycle, MSE + 1e-6 KL. DiT: on the VAE "
        f"posterior (mean + std noise), {dit_steps} AdamW steps, batch 128, lr 1e-3 one-cycle, "
        "grad clip 1, 10% label dropout, uniform timesteps, EMA 0.995 (saved). "
        f"{train_cpu / 60:.1f} CPU-minutes, torch threads: {torch.get_num_threads()}.",
        metrics=metrics,
        seed=seed,
        train_seconds=time.perf_counter() - start,
        limitations="Only the ten digit classes, 32x32 grey images in the style of the 8x8 scikit-learn digits "
        "(blurry, upsampled). Accuracy and FD come from a small classifier trained on the same data.",
    )
    return metrics


def int_id2label(folder: str | Path) -> dict[str, Any]:
    """``{"id2label": {int: str}}`` from a DiT pipeline folder's ``model_index.json`` (``{}`` without
    one). JSON keys are strings, and ``DiTPipeline`` warns about them on every load when the saved
    mapping is passed through as is; pass this to ``from_pretrained`` to load it with int keys."""
    import json

    index = Path(folder) / "model_index.json"
    try:
        labels = json.loads(index.read_text(encoding="utf-8")).get("id2label")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(labels, dict):
        return {}
    try:
        return {"id2label": {int(k): v for k, v in labels.items()}}
    except ValueError:
        return {}


def load(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """The committed pipeline (or the one at ``path``) via ``DiTPipeline.from_pretrained``, in eval
    mode with the progress bar off."""
    from diffusers import DiTPipeline

    from mmaccel.apps.zoo import zoo_path

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    folder = zoo_path(NAME) if path is None else path
    pipe = DiTPipeline.from_pretrained(str(folder), dtype=dtype, **int_id2label(folder))
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae):
        module.eval()
    return pipe.to(device)
