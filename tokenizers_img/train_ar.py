"""Training for raster / NAR / PAR-style image-token GPTs: mask, target assembly, a small CPU loop.

Teacher forcing feeds ``[condition, all tokens in raster order]`` once under the schedule's
group mask (for NAR the proximity mask) and assembles each token's logits exactly as decoding
does: from the row head of the fed token the schedule names, the column head, or their mean
(He et al., "Neighboring Autoregressive Modeling for Efficient Visual Generation", 2025).
So a greedy decode reproduces the argmax of these logits on its own output.

``python -m mmaccel.tokenizers_img.train_ar`` trains tiny raster and NAR models on scikit-learn's
8x8 digits (pixel intensities 0..16 as tokens, digit as class) and reports held-out NLL and how
often a digit classifier recognises the requested class in generated samples.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmaccel.tokenizers_img.gpt import GPT, GPTConfig
from mmaccel.tokenizers_img.orders import Schedule, nar_schedule, raster_schedule

__all__ = [
    "TrainConfig",
    "source_indices",
    "teacher_forced_logits",
    "ar_loss",
    "train",
    "digit_tokens",
    "tiny_digit_gpt",
]


def source_indices(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per raster cell, the sequence index whose row / column head predicts it (-1: none).

    Indices refer to ``[last condition token, image token 0, ..., image token H*W-1]``.
    """
    n = schedule.height * schedule.width
    row, col = torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    for i, step in enumerate(schedule.steps):
        fed = torch.zeros(1, dtype=torch.long) if i == 0 else step.inputs + 1
        for src, out in ((step.row_src, row), (step.col_src, col)):
            valid = src >= 0
            out[step.targets[valid]] = fed[src[valid]]
    return row, col


def teacher_forced_logits(
    model: GPT, tokens: torch.Tensor, cond: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """Logits ``[B, H*W, V]`` (raster order) for ground-truth ``tokens [B, H, W]``, one forward pass."""
    height, width = schedule.height, schedule.width
    if tokens.ndim != 3 or tokens.shape[1:] != (height, width):
        raise ValueError(
            f"tokens must be [B, {height}, {width}] for this schedule, got {tuple(tokens.shape)}"
        )
    if tokens.min() < 0 or tokens.max() >= model.config.vocab_size:
        raise ValueError(f"token indices must be in [0, {model.config.vocab_size})")
    n_cond = model.config.cls_token_num
    x = torch.cat([model.embed_condition(cond), model.tok_embeddings(tokens.flatten(1))], dim=1)
    device = x.device
    positions = torch.arange(x.shape[1], device=device)
    column = schedule.uses_column_head
    h_row, h_col = model.hidden(
        x, positions, schedule.mask(n_cond).to(device), (height, width), column=column
    )
    row, col = source_indices(schedule)
    logits = torch.zeros(x.shape[0], height * width, model.config.vocab_size, device=device)
    count = torch.zeros(height * width, device=device)
    for src, head, h in ((row, model.row_logits, h_row), (col, model.column_logits, h_col)):
        valid = src >= 0
        if bool(valid.any()):
            logits[:, valid.to(device)] += head(h[:, n_cond - 1 :][:, src[valid].to(device)])
            count[valid.to(device)] += 1
    return logits / count[:, None]


def ar_loss(model: GPT, tokens: torch.Tensor, cond: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``tokens [B, H, W]`` in ``schedule``'s order."""
    logits = teacher_forced_logits(model, tokens, cond, schedule)
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


@dataclass(frozen=True)
class TrainConfig:
    """AdamW steps on random minibatches; labels are replaced by the null class with
    probability ``model.config.class_dropout_prob`` (CFG training, as LlamaGen)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


def train(
    model: GPT,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on ``tokens [N, H, W]`` with class ``labels [N]``; returns the loss per step."""
    if tokens.shape[0] != labels.shape[0]:
        raise ValueError(f"tokens and labels disagree on N: {tokens.shape[0]} vs {labels.shape[0]}")
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    drop = model.config.class_dropout_prob
    losses = []
    model.train()
    for _ in tqdm(range(config.steps), desc=f"train {schedule.name}", disable=not progress):
        idx = torch.randint(tokens.shape[0], (config.batch_size,), generator=gen)
        cond = labels[idx]
        if drop > 0:
            cond = torch.where(torch.rand(cond.shape, generator=gen) < drop, model.config.num_classes, cond)
        loss = ar_loss(model, tokens[idx], cond, schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def digit_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as token grids (intensity 0..16 = 17 tokens) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.as_tensor(digits.images, dtype=torch.long), torch.as_tensor(digits.target, dtype=torch.long)


def tiny_digit_gpt(seed: int = 0) -> GPT:
    """A ~0.2M-parameter NAR-capable GPT for the 17-token digit grids."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=17, dim=64, n_layer=3, n_head=4, num_classes=10, multiple_of=32))


def main(argv: list[str] | None = None) -> None:
    from sklearn.linear_model import LogisticRegression

    from mmaccel.runtime.tables import markdown_table
    from mmaccel.tokenizers_img.decoding import decode
    from mmaccel.tokenizers_img.sampling import SamplingConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=100, help="generated digits per order")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokens, labels = digit_tokens()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, trn = perm[:300], perm[300:]
    clf = LogisticRegression(max_iter=2000).fit(tokens[trn].flatten(1).numpy(), labels[trn].numpy())
    rows = []
    for schedule in (raster_schedule(8, 8), nar_schedule(8, 8)):
        model = tiny_digit_gpt()
        losses = train(
            model,
            tokens[trn],
            labels[trn],
            schedule,
            TrainConfig(steps=args.steps, batch_size=args.batch_size),
        )
        with torch.no_grad():
            nll = ar_loss(model, tokens[test], labels[test], schedule).item()
        want = torch.arange(args.samples) % 10
        out = decode(
            model,
            want,
            schedule,
            SamplingConfig(cfg_scale=args.cfg),
            generator=torch.Generator().manual_seed(0),
        )
        acc = (torch.as_tensor(clf.predict(out.tokens.flatten(1).numpy())) == want).float().mean().item()
        rows.append([schedule.name, out.forward_passes, losses[0], losses[-1], nll / math.log(2), acc])
    print(
        markdown_table(
            ["order", "forwards", "first loss", "last loss", "test bits/token", "class accuracy of samples"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
