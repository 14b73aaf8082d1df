"""Zoo entry ``digits-nar``: a 2-D VQ tokenizer and two class-conditional token GPTs on digits.

The repo's LlamaGen-architecture :class:`~mmaccel.tokenizers_img.vq.VQModel` turns 32x32 digits into an
8x8 grid of 64 codes; two LlamaGen-style :class:`~mmaccel.tokenizers_img.gpt.GPT` models of equal depth
generate such grids per class: one trained with the NAR objective (He et al., "Neighboring
Autoregressive Modeling for Efficient Visual Generation", 2025; row and column heads, proximity
mask, 15 forward passes for 8x8) and one with the raster objective (64 forward passes). The NAR
model cannot stand in for the raster one: its row head never learnt to predict the first token of
the next row, and in raster order its held-out bits/token are far worse (``evaluate`` reports
both), hence two models.

Sample quality is measured with the zoo's digit classifier (:mod:`mmaccel.apps.zoo.digits`): accuracy on
the requested class and the Frechet distance of its features to the 360 held-out digits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mmaccel.apps.zoo.digits import (
    classifier_accuracy,
    digit_images,
    digit_split,
    frechet_distance,
    load_digit_classifier,
)
from mmaccel.runtime.metrics import psnr
from mmaccel.tokenizers_img.decoding import Decoded, decode
from mmaccel.tokenizers_img.gpt import GPT, GPTConfig
from mmaccel.tokenizers_img.orders import Schedule, nar_schedule, raster_schedule
from mmaccel.tokenizers_img.sampling import SamplingConfig
from mmaccel.tokenizers_img.train_ar import TrainConfig, ar_loss
from mmaccel.tokenizers_img.train_ar import train as train_gpt
from mmaccel.tokenizers_img.train_tokenizer import train as train_vq
from mmaccel.tokenizers_img.vq import VQConfig, VQModel

__all__ = [
    "NAME",
    "GRID",
    "ORDERS",
    "CFG_SCALE",
    "DigitsNAR",
    "vq_config",
    "gpt_config",
    "schedule",
    "shifted_tokens",
    "generate",
    "evaluate",
    "train",
    "load",
]

NAME = "digits-nar"
GRID = 8  # 32x32 digits, VQ downsample 4
ORDERS = ("nar", "raster")
#: CFG scale for every reported sample; 1.5 gave the lowest FD for both orders in the prototype.
CFG_SCALE = 1.5
NUM_CLASSES = 10
_VQ_STEPS, _VQ_BATCH, _VQ_LR = 200, 32, 2e-3
_GPT = TrainConfig(steps=1500, batch_size=64, lr=3e-3)
_MAX_SHIFT = 1  # token-grid augmentation: every digit encoded at all shifts up to 1 px


@dataclass(frozen=True)
class DigitsNAR:
    """The tokenizer and one GPT per decoding order, in eval mode."""

    tokenizer: VQModel
    nar: GPT
    raster: GPT

    def gpt(self, order: str) -> GPT:
        """The GPT trained for ``order`` (``"nar"`` or ``"raster"``)."""
        _check_order(order)
        return self.nar if order == "nar" else self.raster


def _check_order(order: object) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def vq_config() -> VQConfig:
    """1-channel LlamaGen-architecture VQ: downsample 4, codebook 64 x 8, dead-code restarts."""
    return VQConfig(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                    ch=16, z_channels=32, num_res_blocks=1, norm_groups=8, in_channels=1,
                    dead_code_restart=10)  # fmt: skip


def gpt_config(order: str) -> GPTConfig:
    """5 transformer blocks, 64 wide, for either order: NAR is a 4-block trunk + 1 column block."""
    _check_order(order)
    nar = order == "nar"
    return GPTConfig(vocab_size=vq_config().codebook_size, dim=64, n_layer=4 if nar else 5, n_head=4,
                     multiple_of=32, num_classes=NUM_CLASSES, column_blocks=int(nar))  # fmt: skip


def schedule(order: str) -> Schedule:
    """The 8x8 decoding (and training) schedule of ``order``."""
    _check_order(order)
    return nar_schedule(GRID, GRID) if order == "nar" else raster_schedule(GRID, GRID)


@torch.no_grad()
def shifted_tokens(
    tokenizer: VQModel, images: torch.Tensor, labels: torch.Tensor, max_shift: int = _MAX_SHIFT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token grids of ``images`` [N, 1, 32, 32] in [0, 1] at every shift up to ``max_shift`` px (zero fill)."""
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    s, size = max_shift, images.shape[-1]
    padded = F.pad(images, (s,) * 4)
    shifts = [(dy, dx) for dy in range(2 * s + 1) for dx in range(2 * s + 1)]
    tokens = torch.cat(
        [tokenizer.encode(padded[..., dy : dy + size, dx : dx + size] * 2 - 1) for dy, dx in shifts]
    )
    return tokens, labels.repeat(len(shifts))


@torch.no_grad()
def generate(
    models: DigitsNAR,
    labels: torch.Tensor,
    order: str = "nar",
    *,
    cfg_scale: float = CFG_SCALE,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Decoded]:
    """Digits ``[N, 1, 32, 32]`` in [0, 1] for class ``labels [N]`` (0..9), and the decoded tokens."""
    _check_order(order)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.long:
        raise TypeError(f"labels must be a 1-D long tensor of digits 0..9, got {labels!r}")
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be non-empty digits in [0, {NUM_CLASSES}), got {labels.tolist()}")
    gpt = models.gpt(order)
    out = decode(gpt, labels.to(gpt.output.weight.device), schedule(order), SamplingConfig(cfg_scale=cfg_scale),
                 generator=generator)  # fmt: skip
    images = (models.tokenizer.decode(out.tokens.to(models.tokenizer.decoder.conv_in.weight.device)) + 1) / 2
    return images.float().clamp(0, 1), out


@torch.no_grad()
def evaluate(
    models: DigitsNAR,
    *,
    samples_per_class: int = 20,
    cfg_scale: float = CFG_SCALE,
    seed: int = 0,
    orders: tuple[str, ...] = ORDERS,
) -> dict[str, float | int]:
    """Tokenizer and sample quality on the 360 held-out digits (see the module docstring).

    Tokenizer: reconstruction PSNR (dB), codes used, classifier accuracy and FD of the
    reconstructions (the floor for samples). Per order: held-out bits/token, and for
    ``samples_per_class`` samples per digit (generator seeded with ``seed``) classifier accuracy,
    FD vs the real test digits and forward passes per batch; and the NAR model's bits/token in
    raster order (why a separate raster model is needed).
    """
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class must be an int >= 1, got {samples_per_class!r}")
    for order in orders:
        _check_order(order)
    images, labels = digit_images(32)
    test_idx = digit_split()[1]
    test = images[test_idx], labels[test_idx]
    clf = load_digit_classifier()
    real = clf.features(test[0])
    vq = models.tokenizer
    device, dtype = vq.decoder.conv_in.weight.device, vq.decoder.conv_in.weight.dtype
    tokens = vq.encode(test[0].to(device, dtype) * 2 - 1)
    recon = ((vq.decode(tokens).float().cpu() + 1) / 2).clamp(0, 1)
    metrics: dict[str, float | int] = {
        "VQ PSNR on test digits (dB)": psnr(recon, test[0], data_range=1.0),
        "VQ codes used on test digits (of 64)": tokens.unique().numel(),
        "classifier accuracy of VQ reconstructions": classifier_accuracy(clf, recon, test[1]),
        "FD of VQ reconstructions vs test digits (floor)": frechet_distance(clf.features(recon), real),
    }
    want = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)
    for order in orders:
        gpt = models.gpt(order)
        nats = ar_loss(gpt, tokens, test[1].to(device), schedule(order)).item()
        samples, out = generate(models, want, order, cfg_scale=cfg_scale,
                                generator=torch.Generator(device).manual_seed(seed))  # fmt: skip
        samples = samples.cpu()
        metrics[f"{order}: held-out bits/token"] = nats / math.log(2)
        metrics[f"{order}: classifier accuracy of samples"] = classifier_accuracy(clf, samples, want)
        metrics[f"{order}: FD of samples vs test digits"] = frechet_distance(clf.features(samples), real)
        metrics[f"{order}: forward passes per batch"] = out.forward_passes
    if "nar" in orders:
        nats = ar_loss(models.nar, tokens, test[1].to(device), schedule("raster")).item()
        metrics["NAR model decoded in raster order: held-out bits/token"] = nats / math.log(2)
    return metrics


def train(output: Path, *, seed: int = 0, progress: bool = True) -> dict[str, float | int | str]:
    """Train the tokenizer, then the NAR and raster GPTs on its token grids; save to ``output``."""
    from mmaccel.apps.zoo.card import write_model_card

    start, cpu_start = time.perf_counter(), time.process_time()
    output = Path(output)
    images, labels = digit_images(32)
    train_idx, test_idx = digit_split()
    x_train, x_test = images[train_idx] * 2 - 1, images[test_idx] * 2 - 1
    torch.manual_seed(seed)
    tokenizer = VQModel(vq_config())
    train_vq(tokenizer, list(x_train), x_test, _VQ_STEPS, _VQ_BATCH, _VQ_LR, seed, progress=progress)
    tokenizer.eval()
    tokens, token_labels = shifted_tokens(tokenizer, images[train_idx], labels[train_idx])
    gpts = {}
    for order in ORDERS:
        torch.manual_seed(seed)
        gpts[order] = GPT(gpt_config(order))
        train_gpt(
            gpts[order], tokens, token_labels, schedule(order), replace(_GPT, seed=seed), progress=progress
        )
    models = DigitsNAR(tokenizer, gpts["nar"], gpts["raster"])
    tokenizer.save_pretrained(output / "tokenizer")
    for order, gpt in gpts.items():
        gpt.save_pretrained(output / order)
    metrics: dict[str, float | int | str] = {**evaluate(models, seed=seed), "CFG scale": CFG_SCALE}
    metrics["training CPU seconds"] = round(time.process_time() - cpu_start, 1)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("VQ", tokenizer), *gpts.items())}
    write_model_card(
        output,
        name=NAME,
        summary="A 2-D VQ tokenizer (32x32 digit -> 8x8 grid of 64 codes) and two class-conditional "
        "LlamaGen-style token GPTs of equal depth, one trained with the NAR objective (next-neighbour "
        "decoding, 15 forward passes) and one with the raster objective (64 forward passes), so "
        "mmaccel can compare NAR and raster decoding on real samples. Folders: `tokenizer/` "
        "(`VQModel.from_pretrained`), `nar/` and `raster/` (`GPT.from_pretrained`).",
        architecture=f"VQ: LlamaGen VQModel, 1 channel, ch 16, multipliers (1, 2, 2), codebook 64 x 8 "
        f"(L2-normalised), {params['VQ']:,} parameters. GPTs: dim 64, 4 heads, SwiGLU, 2-D RoPE, "
        f"class token with a null class for CFG; NAR = 4 trunk blocks + 1 column block "
        f"({params['nar']:,} parameters), raster = 5 blocks ({params['raster']:,} parameters).",
        data="scikit-learn `load_digits` at 32x32 in [0, 1] (`mmaccel.apps.zoo.digits.digit_images`), the 1,437 "
        "training digits of `digit_split()`; the GPTs see their token grids at all 9 shifts of up to "
        "1 px (12,933 grids). All metrics use the 360 held-out digits.",
        training=f"VQ: Adam lr {_VQ_LR} (cosine), batch {_VQ_BATCH}, {_VQ_STEPS} steps, pixel MSE + "
        f"codebook/commitment losses, dead-code restarts every 10 steps. Each GPT: AdamW lr {_GPT.lr} "
        f"(cosine), batch {_GPT.batch_size}, {_GPT.steps} steps, class dropout 0.1, next-token "
        "cross-entropy in its own order (NAR: proximity mask, row/column heads).",
        metrics=metrics,
        seed=seed,
        train_seconds=time.perf_counter() - start,
        limitations="Digits only, 8x8 tokens; samples come from 1,437 training digits and are judged by a "
        "small classifier trained on the same data, so accuracy and FD compare decoding orders, not "
        "image models. The NAR model decoded in raster order is poor (see its bits/token above); "
        "use the raster model for raster decoding.",
    )
    return metrics


def load(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DigitsNAR:
    """The committed models (or those under ``path``) on ``device`` in ``dtype``, eval mode."""
    from mmaccel.apps.zoo import zoo_path

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    root = zoo_path(NAME) if path is None else Path(path)
    tokenizer = VQModel.from_pretrained(root / "tokenizer", map_location=device)
    nar, raster = (GPT.from_pretrained(root / order, map_location=device) for order in ORDERS)
    return DigitsNAR(*(m.to(device=device, dtype=dtype).eval() for m in (tokenizer, nar, raster)))
