"""Digits for the zoo: scikit-learn's 8x8 digits at 32x32, a fixed split, and a digit classifier
whose accuracy on generated samples and feature Frechet distance (as FID, Heusel et al. 2017)
measure sample quality for the digit models."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "NAME",
    "NUM_TEST",
    "digit_images",
    "digit_split",
    "DigitClassifier",
    "load",
    "load_digit_classifier",
    "classifier_accuracy",
    "frechet_distance",
    "train",
]

NAME = "digit-classifier"
NUM_TEST = 360


def digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``[N, 1, size, size]`` float32 in [0, 1] (bilinear upsampling) and labels."""
    from sklearn.datasets import load_digits

    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return images.clamp(0, 1), torch.as_tensor(digits.target, dtype=torch.long)


def digit_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed ``(train_idx [1437], test_idx [360])`` permutation split of the 1,797 digits."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return perm[NUM_TEST:], perm[:NUM_TEST]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"images must be [N, 1, 32, 32] in [0, 1], got shape {tuple(images.shape)}")


class DigitClassifier(nn.Module, PyTorchModelHubMixin):
    """Three conv blocks and a linear head on ``[N, 1, 32, 32]`` digits in [0, 1]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 4 * width]`` pooled features (the Frechet distance space)."""
        _check_images(images)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> DigitClassifier:
    """The committed classifier (or one at ``path``) in eval mode."""
    from mmaccel.apps.zoo import zoo_path

    model = DigitClassifier.from_pretrained(str(zoo_path(NAME) if path is None else path))
    return model.to(device).eval()


load_digit_classifier = load


@torch.no_grad()
def classifier_accuracy(clf: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``clf`` assigns to ``labels``."""
    _check_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
    return (clf(images).argmax(-1) == labels.to(images.device)).float().mean().item()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two ``[N, D]`` feature sets."""
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be [N >= 2, D], got {tuple(f.shape)}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    a, b = (f.detach().double().cpu().numpy() for f in (feats_a, feats_b))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2): symmetric PSD eigenproblems, stable for singular A, B.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def _shift(images: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations (zero fill) so the classifier tolerates off-centre samples."""
    n = images.shape[0]
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    size = images.shape[-1]
    return torch.stack([padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)])


def train(output: Path, *, seed: int = 0, progress: bool = True, steps: int = 1500) -> dict[str, object]:
    """Train on the 1,437 training digits (random shifts), save to ``output``, return test accuracy."""
    from mmaccel.apps.zoo.card import write_model_card

    start = time.perf_counter()
    images, labels = digit_images(32)
    train_idx, test_idx = digit_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x_train, y_train = images[train_idx], labels[train_idx]
    model.train()
    for _ in tqdm(range(steps), desc="train digit classifier", disable=not progress):
        idx = torch.randint(len(train_idx), (64,), generator=gen)
        loss = F.cross_entropy(model(_shift(x_train[idx], gen)), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        feats_train, feats_test = model.features(x_train), model.features(images[test_idx])
    metrics = {
        "test accuracy (360 held-out digits)": classifier_accuracy(model, images[test_idx], labels[test_idx]),
        "train accuracy": classifier_accuracy(model, x_train, y_train),
        "FD train vs test digits (floor for samples)": frechet_distance(feats_train, feats_test),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    output = Path(output)
    model.save_pretrained(output)
    write_model_card(
        output,
        name=NAME,
        summary="A small CNN that recognises scikit-learn digits at 32x32. The zoo uses its accuracy "
        "on generated digits and the Frechet distance of its pooled features as sample-quality figures.",
        architecture="3 x (conv3x3, ReLU, pool) with 16/32/64 channels, global average pool, linear 64 -> 10.",
        data="scikit-learn `load_digits` (1,797 8x8 images, 0..16), bilinearly upsampled to 32x32 in [0, 1]; "
        "1,437 train / 360 test digits (`digit_split()`).",
        training=f"AdamW lr 3e-3 (cosine), batch 64, {steps} steps, random shifts of up to 2 px.",
        metrics=metrics,
        seed=seed,
        train_seconds=time.perf_counter() - start,
        limitations="Trained on 1,437 clean digits; confident on anything digit-like, so pair accuracy with FD.",
    )
    return metrics
