"""Train a small VQ or 1-D compact tokenizer on CPU on images that ship offline; report PSNR.

Data: random crops of 12 ``skimage.data`` images (``chelsea`` held out for evaluation) or
scikit-learn's 8x8 digits (the last 297 held out). The loss is pixel MSE plus the quantiser
losses; LlamaGen's LPIPS and GAN terms are left out (they need pretrained VGG weights).

    python -m mmaccel.tokenizers_img.train_tokenizer --model vq --steps 200
    python -m mmaccel.tokenizers_img.train_tokenizer --model compact1d --steps 200 --out /tmp/tok
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mmaccel.runtime import metrics
from mmaccel.tokenizers_img.compact_1d import Compact1DConfig, Compact1DTokenizer
from mmaccel.tokenizers_img.vq import VQConfig, VQModel

__all__ = [
    "SKIMAGE_TRAIN",
    "SKIMAGE_EVAL",
    "load_images",
    "sample_crops",
    "psnr",
    "tiny_vq_config",
    "tiny_compact_config",
    "train_step",
    "evaluate_psnr",
    "TrainReport",
    "train",
    "main",
]

SKIMAGE_TRAIN = (
    "astronaut", "camera", "coffee", "rocket", "immunohistochemistry", "retina",
    "colorwheel", "coins", "moon", "page", "text", "horse",
)
SKIMAGE_EVAL = ("chelsea",)
_DIGITS_TRAIN = 1500


def _to_tensor(array: object) -> torch.Tensor:
    """uint8/bool HxW or HxWxC array -> float [3, H, W] in [-1, 1]."""
    t = torch.as_tensor(array)
    t = t.float() if t.dtype == torch.bool else t.float() / 255.0
    if t.ndim == 2:
        t = t.unsqueeze(-1)
    t = t[..., :3].permute(2, 0, 1)
    return (t.expand(3, -1, -1) if t.shape[0] == 1 else t).contiguous() * 2 - 1


def load_images(source: str, split: str, short_side: int = 128) -> list[torch.Tensor]:
    """Images ``[3, H, W]`` in [-1, 1] from ``"skimage"`` (shorter side resized to ``short_side``) or ``"digits"``.

    ``split`` is ``"train"`` or ``"eval"`` (disjoint images).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if source == "skimage":
        import skimage.data

        names = SKIMAGE_TRAIN if split == "train" else SKIMAGE_EVAL
        out = []
        for name in names:
            img = _to_tensor(getattr(skimage.data, name)())
            scale = short_side / min(img.shape[1:])
            size = (round(img.shape[1] * scale), round(img.shape[2] * scale))
            out.append(F.interpolate(img[None], size=size, mode="bilinear", antialias=True)[0].clamp(-1, 1))
        return out
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0 * 2 - 1
        digits = digits[:_DIGITS_TRAIN] if split == "train" else digits[_DIGITS_TRAIN:]
        return list(digits[:, None].expand(-1, 3, -1, -1))
    raise ValueError(f"source must be 'skimage' or 'digits', got {source!r}")


def sample_crops(images: Sequence[torch.Tensor], n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` crops (images smaller than ``size`` are resized up first)."""
    crops = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        if min(img.shape[1:]) < size:
            img = F.interpolate(img[None], size=(size, size), mode="bilinear")[0]
        top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=generator))
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2), after clamping the reconstruction."""
    return metrics.psnr(reconstruction.clamp(-1, 1), target, data_range=2.0)


def tiny_vq_config(**overrides: object) -> VQConfig:
    """A CPU-trainable LlamaGen-architecture VQ: downsample 4, codebook 512 x 8, dead-code restarts."""
    base = dict(codebook_size=512, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), ch=32,
                z_channels=32, num_res_blocks=1, norm_groups=8, dead_code_restart=10)
    return VQConfig(**{**base, **overrides})


def tiny_compact_config(**overrides: object) -> Compact1DConfig:
    """A CPU-trainable 1-D tokenizer: 32 px images, patch 4, 32 tokens, VQ 512 x 8 with dead-code restarts.

    (FSQ, ``quantizer="fsq"``, needs longer runs: its rounding step is coarse next to the small
    image-to-image spread of freshly initialised latents, so short runs use very few codes.)
    """
    base = dict(image_size=32, patch_size=4, width=128, encoder_depth=3, decoder_depth=3, num_heads=4,
                num_latent_tokens=32, quantizer="vq", codebook_size=512, token_dim=8, dead_code_restart=10)
    return Compact1DConfig(**{**base, **overrides})


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    """One optimisation step on ``images``; returns the loss."""
    model.train()
    if isinstance(model, VQModel):
        loss = model(images).loss(images)
    elif isinstance(model, Compact1DTokenizer):
        loss = model(images)[1].loss
    else:
        raise TypeError(f"model must be a VQModel or Compact1DTokenizer, got {type(model).__name__}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate_psnr(model: nn.Module, images: torch.Tensor, prefix_lengths: Sequence[int] = ()) -> dict[str, float]:
    """Reconstruction PSNR through the discrete tokens (encode -> decode).

    For a :class:`Compact1DTokenizer`, one entry per prefix length (``"k=8"``), default all K tokens.
    """
    model.eval()
    indices = model.encode(images)
    if isinstance(model, VQModel):
        return {"psnr": psnr(model.decode(indices), images)}
    lengths = tuple(prefix_lengths) or (indices.shape[1],)
    return {f"k={k}": psnr(model.decode(indices[:, :k]), images) for k in lengths}


@dataclass
class TrainReport:
    """Losses per step and held-out PSNR before and after training."""

    losses: list[float] = field(default_factory=list)
    psnr_before: dict[str, float] = field(default_factory=dict)
    psnr_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train(
    model: nn.Module,
    train_images: Sequence[torch.Tensor],
    eval_batch: torch.Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    prefix_lengths: Sequence[int] = (),
    progress: bool = True,
) -> TrainReport:
    """Adam on random crops of ``train_images`` sized like ``eval_batch``; PSNR on ``eval_batch``."""
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    report = TrainReport(psnr_before=evaluate_psnr(model, eval_batch, prefix_lengths))
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"train {type(model).__name__}", disable=not progress):
        crops = sample_crops(train_images, batch_size, eval_batch.shape[-1], generator)
        report.losses.append(train_step(model, optimizer, crops))
        schedule.step()
    report.seconds = time.perf_counter() - start
    report.psnr_after = evaluate_psnr(model, eval_batch, prefix_lengths)
    return report


def main(argv: Sequence[str] | None = None) -> TrainReport:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vq", "compact1d"), default="vq")
    parser.add_argument("--data", choices=("skimage", "digits"), default="skimage")
    parser.add_argument("--quantizer", choices=("vq", "fsq"), default="vq", help="1-D tokenizer's quantiser")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32, help="crop size (digits are resized to it)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-size", type=int, default=32, help="number of held-out crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these tiny models on a shared machine)")
    parser.add_argument("--out", help="directory for save_pretrained")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images = load_images(args.data, "train")
    eval_batch = sample_crops(load_images(args.data, "eval"), args.eval_size, args.image_size,
                              torch.Generator().manual_seed(args.seed + 1))
    if args.model == "vq":
        model: nn.Module = VQModel(tiny_vq_config())
        lengths: tuple[int, ...] = ()
    else:
        config = tiny_compact_config(image_size=args.image_size, quantizer=args.quantizer)
        model = Compact1DTokenizer(config)
        k = config.num_latent_tokens
        lengths = tuple(sorted({1, max(1, k // 8), max(1, k // 4), max(1, k // 2), k}))
    report = train(model, train_images, eval_batch, args.steps, args.batch_size, args.lr, args.seed, lengths)
    first, last = report.losses[0], sum(report.losses[-10:]) / len(report.losses[-10:])
    print(f"{args.model} on {args.data}: {args.steps} steps in {report.seconds:.1f} s, loss {first:.4f} -> {last:.4f}")
    for key, before in report.psnr_before.items():
        print(f"  held-out PSNR {key}: {before:.2f} dB -> {report.psnr_after[key]:.2f} dB")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return report


if __name__ == "__main__":
    main()
