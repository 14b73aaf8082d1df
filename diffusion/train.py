"""Distillation fine-tuning of a FlexDiT student against its dense teacher.

FlexDiT (Chang et al., arXiv:2412.06028) is fine-tuned from the pretrained DiT. Here the
student (:class:`~mmaccel.diffusion.flexdit.FlexDiTTransformer2DModel`) learns to reproduce the dense
teacher's output on noised latents: MSE between the two predictions (noise and, for learned-sigma
models, variance channels), plus an optional feature loss between full-resolution hidden states at
matching depths. Training runs through ``accelerate`` (multi-GPU with ``accelerate launch``),
optionally with gradient checkpointing; the student is saved with ``save_pretrained``
(safetensors).

    python -m mmaccel.diffusion.train --model path/to/dit-pipeline --output flexdit-out --steps 1000 \\
        --latents imagenet_latents.safetensors --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmaccel.diffusion.flexdit import FlexDiTConfig, FlexDiTTransformer2DModel, convert_to_flexdit
from mmaccel.runtime.budget import ConstantSchedule, CosineSchedule, LinearSchedule
from mmaccel.runtime.configs import check_floats, check_ints

__all__ = ["DistillConfig", "LatentDataset", "distill", "distillation_loss", "load_transformer", "main"]

_CONDITIONS = ("class_labels", "encoder_hidden_states", "encoder_attention_mask")
M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True)
class DistillConfig:
    """Knobs of :func:`distill`. ``label_dropout`` replaces class labels by the null class (CFG
    training, class-conditional models only); ``feature_weight`` 0 disables the feature loss."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    feature_weight: float = 0.0
    label_dropout: float = 0.1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_ints(self, ("seed",), 0)
        check_ints(self, ("steps", "batch_size", "gradient_accumulation_steps"), 1)
        check_floats(self, ("learning_rate", "max_grad_norm"), positive=True)
        check_floats(self, ("weight_decay", "feature_weight"), positive=False)
        if not isinstance(self.label_dropout, (int, float)) or not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"mixed_precision must be one of 'no', 'fp16', 'bf16', got {self.mixed_precision!r}"
            )


class LatentDataset(Dataset):
    """Clean latents ``(N, C, H, W)`` with their conditioning, as a map-style dataset of dicts.

    Keys: ``latents`` (required) and, per model family, ``class_labels`` (DiT) or
    ``encoder_hidden_states`` + optional ``encoder_attention_mask`` (PixArt, caption-encoder
    outputs before the caption projection). Store/load with safetensors.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        if "latents" not in tensors:
            raise ValueError(f"a latent dataset needs a 'latents' tensor, got keys {sorted(tensors)}")
        unknown = set(tensors) - {"latents", *_CONDITIONS}
        if unknown:
            raise ValueError(
                f"unknown dataset keys {sorted(unknown)}; allowed: latents, {', '.join(_CONDITIONS)}"
            )
        n = tensors["latents"].shape[0]
        if tensors["latents"].ndim != 4 or n == 0:
            raise ValueError(
                f"latents must be a non-empty (N, C, H, W) tensor, got {tuple(tensors['latents'].shape)}"
            )
        for key, value in tensors.items():
            if value.shape[0] != n:
                raise ValueError(f"{key} has {value.shape[0]} rows but latents has {n}")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return self.tensors["latents"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> LatentDataset:
        return cls(load_file(str(path)))

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path))

    @classmethod
    def synthetic(cls, transformer: ModelMixin, n: int, seed: int = 0, text_tokens: int = 8) -> LatentDataset:
        """Standard-normal latents and random conditioning shaped for ``transformer``.

        A smoke-test source only: it exercises the loop without a dataset; real fine-tuning
        should use VAE-encoded images (``--latents``).
        """
        cfg = transformer.config
        gen = torch.Generator().manual_seed(seed)
        size = cfg.sample_size
        out = {"latents": torch.randn(n, cfg.in_channels, size, size, generator=gen)}
        if _base_class(transformer) == "DiTTransformer2DModel":
            out["class_labels"] = torch.randint(0, cfg.num_embeds_ada_norm, (n,), generator=gen)
        else:
            out["encoder_hidden_states"] = torch.randn(n, text_tokens, cfg.caption_channels, generator=gen)
            out["encoder_attention_mask"] = torch.ones(n, text_tokens)
        return cls(out)


def _base_class(model: ModelMixin) -> str:
    return model.base_class if isinstance(model, FlexDiTTransformer2DModel) else type(model).__name__


def _model_inputs(
    model: ModelMixin, batch: dict[str, torch.Tensor], noisy: torch.Tensor, t: torch.Tensor
) -> dict:
    """Keyword arguments of the dense model's forward (and so of the FlexDiT student's)."""
    if _base_class(model) == "DiTTransformer2DModel":
        return {"hidden_states": noisy, "timestep": t, "class_labels": batch["class_labels"]}
    added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if getattr(model, "use_additional_conditions", False):
        b, _, h, w = noisy.shape
        added = {"resolution": noisy.new_tensor([[h * 8.0, w * 8.0]]).repeat(b, 1),
                 "aspect_ratio": noisy.new_tensor([[h / w]]).repeat(b, 1)}  # fmt: skip
    return {"hidden_states": noisy, "timestep": t, "encoder_hidden_states": batch["encoder_hidden_states"],
            "encoder_attention_mask": batch.get("encoder_attention_mask"), "added_cond_kwargs": added}  # fmt: skip


class _Features:
    """Forward hooks capturing the outputs of aligned student / teacher modules."""

    def __init__(self, student: FlexDiTTransformer2DModel, teacher: ModelMixin) -> None:
        self.pairs = student.feature_alignment()
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.handles = []
        for path, index in self.pairs:
            self.handles.append(
                student.get_submodule(path).register_forward_hook(self._keep(self.student, path))
            )
            block = teacher.transformer_blocks[index]
            self.handles.append(block.register_forward_hook(self._keep(self.teacher, path)))

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], key: str):
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            store[key] = output

        return hook

    def loss(self) -> torch.Tensor:
        return torch.stack(
            [F.mse_loss(self.student[p].float(), self.teacher[p].float()) for p, _ in self.pairs]
        ).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def distillation_loss(
    student: FlexDiTTransformer2DModel,
    teacher: ModelMixin,
    batch: dict[str, torch.Tensor],
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    feature_weight: float = 0.0,
    label_dropout: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise a clean batch at uniform random timesteps; MSE of the student's output to the teacher's.

    Returns the total loss and its parts (``output``, ``feature``). Random draws (timesteps,
    noise, label dropout) come from ``generator`` (CPU), so a fixed generator gives a fixed loss.
    """
    latents = batch["latents"]
    b, device = latents.shape[0], latents.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    noisy = scheduler.add_noise(latents, noise, t)
    batch = dict(batch)
    if label_dropout > 0 and "class_labels" in batch:
        drop = (torch.rand(b, generator=generator) < label_dropout).to(device)
        null = torch.full_like(batch["class_labels"], teacher.config.num_embeds_ada_norm)
        batch["class_labels"] = torch.where(drop, null, batch["class_labels"])
    inputs = _model_inputs(teacher, batch, noisy, t)
    features = _Features(unwrap(student), teacher) if feature_weight > 0 else None
    try:
        with torch.no_grad():
            target = teacher(**inputs).sample
        pred = student(**inputs).sample
        output_loss = F.mse_loss(pred.float(), target.float())
        feature_loss = features.loss() if features else torch.zeros((), device=device)
    finally:
        if features:
            features.remove()
    loss = output_loss + feature_weight * feature_loss
    return loss, {"output": output_loss.item(), "feature": feature_loss.item()}


def unwrap(model: torch.nn.Module, cls: type[M] = FlexDiTTransformer2DModel) -> M:
    """The ``cls`` inside DDP / accelerate wrappers (their ``.module``)."""
    while hasattr(model, "module") and not isinstance(model, cls):
        model = model.module
    return model


def distill(
    student: FlexDiTTransformer2DModel,
    teacher: ModelMixin,
    dataset: Dataset,
    config: DistillConfig | None = None,
    scheduler: DDPMScheduler | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``student`` in place to match ``teacher``; returns the loss of every step.

    Both models run in eval mode (no dropout; DiT's per-block label dropout would disagree
    between blocks), with CFG label dropout done here, identically for teacher and student.
    ``scheduler`` defaults to DiT's linear-beta DDPM schedule.
    """
    from accelerate import Accelerator

    config = config or DistillConfig()
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    torch.manual_seed(config.seed)
    teacher.requires_grad_(False).eval().to(accelerator.device)
    student.requires_grad_(True).eval()
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) >= config.batch_size,
                        generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    generator = torch.Generator().manual_seed(config.seed + 1 + accelerator.process_index)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    losses: list[float] = []
    bar = tqdm(
        range(config.steps),
        desc="distil FlexDiT",
        disable=not (progress and accelerator.is_local_main_process),
    )
    for _ in bar:
        with accelerator.accumulate(student):
            loss, parts = distillation_loss(student, teacher, next(batches), scheduler, generator,
                                            config.feature_weight, config.label_dropout)  # fmt: skip
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4g}", feature=f"{parts['feature']:.3g}")
    if config.gradient_checkpointing:
        unwrap(student).disable_gradient_checkpointing()
    return losses


def load_transformer(path: str | Path) -> ModelMixin:
    """A dense DiT/PixArt transformer or a FlexDiT model from a model or pipeline folder."""
    path = Path(path)
    subfolder = "transformer" if (path / "model_index.json").exists() else None
    config_file = path / (subfolder or "") / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no transformer config.json under {path}")
    name = json.loads(config_file.read_text()).get("_class_name")
    if name == FlexDiTTransformer2DModel.__name__:
        return FlexDiTTransformer2DModel.from_pretrained(path, subfolder=subfolder)
    if name not in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        raise ValueError(f"{config_file} holds a {name}; expected a DiT, PixArt or FlexDiT transformer")
    return getattr(diffusers, name).from_pretrained(path, subfolder=subfolder)


def _parse_schedule(text: str):
    kind, *values = text.split(":")
    kinds = {"constant": ConstantSchedule, "linear": LinearSchedule, "cosine": CosineSchedule}
    if kind not in kinds:
        raise argparse.ArgumentTypeError(
            f"schedule must be constant:R, linear:START:END or cosine:START:END, got {text!r}"
        )
    try:
        return kinds[kind](*map(float, values))
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"bad schedule {text!r}: {err}") from err


def _ints(sep: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(sep))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected integers separated by {sep!r}, got {text!r}") from err

    return parse


def build_parser() -> argparse.ArgumentParser:
    d, f = DistillConfig(), FlexDiTConfig()
    p = argparse.ArgumentParser(prog="python -m mmaccel.diffusion.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument(
        "--model", required=True, help="dense teacher: a DiT/PixArt pipeline or transformer folder"
    )
    p.add_argument("--output", required=True, help="folder for the fine-tuned FlexDiT model (safetensors)")
    p.add_argument("--student", help="resume from this FlexDiT folder instead of converting --model")
    p.add_argument("--latents", help="safetensors file of clean latents + conditioning (see LatentDataset)")
    p.add_argument(
        "--synthetic-samples", type=int, default=64, help="random latents when --latents is not given"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per device")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--feature-weight", type=float, default=d.feature_weight, help="hidden-state loss weight (0: off)"
    )
    p.add_argument("--label-dropout", type=float, default=d.label_dropout, help="null-class rate (DiT CFG)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=d.mixed_precision)
    p.add_argument("--grad-accum", type=int, default=d.gradient_accumulation_steps, help="accumulation steps")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, timesteps, noise")
    g = p.add_argument_group("FlexDiT layout (when converting --model)")
    g.add_argument("--pooling-blocks", type=int, default=f.pooling_blocks, help="bottom Poolingformer blocks")
    g.add_argument("--num-modules", type=int, default=f.num_modules, help="Sparse-Dense Token Modules")
    g.add_argument(
        "--module-layout", type=_ints(","), default=f.module_layout, help="cross,sparse,recovery,dense"
    )
    g.add_argument("--top-dense-blocks", type=int, default=f.top_dense_blocks, help="dense blocks on top")
    g.add_argument("--sparse-grid", type=_ints("x"), default=f.sparse_grid, help="ROWSxCOLS")
    g.add_argument("--schedule", type=_parse_schedule, default=f.schedule,
                   help="temporal density: constant:R, linear:START:END or cosine:START:END")  # fmt: skip
    g.add_argument("--merge-init", choices=("dense", "upsampled"), default=f.merge_init)
    return p


def main(argv: Sequence[str] | None = None) -> list[float]:
    """CLI entry point: convert (or resume), distil, save; returns the step losses."""
    from accelerate import Accelerator

    args = build_parser().parse_args(argv)
    config = DistillConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                           weight_decay=args.weight_decay, feature_weight=args.feature_weight,
                           label_dropout=args.label_dropout, max_grad_norm=args.max_grad_norm,
                           gradient_checkpointing=args.gradient_checkpointing,
                           mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                           seed=args.seed)  # fmt: skip
    teacher = load_transformer(args.model)
    if isinstance(teacher, FlexDiTTransformer2DModel):
        raise ValueError(f"--model must be the dense teacher, got a FlexDiT model at {args.model}")
    if args.student:
        student = load_transformer(args.student)
        if not isinstance(student, FlexDiTTransformer2DModel):
            raise ValueError(f"--student must be a FlexDiT model folder, got {type(student).__name__}")
    else:
        layout = FlexDiTConfig(pooling_blocks=args.pooling_blocks, num_modules=args.num_modules,
                               module_layout=args.module_layout, top_dense_blocks=args.top_dense_blocks,
                               sparse_grid=args.sparse_grid, schedule=args.schedule, merge_init=args.merge_init)  # fmt: skip
        student = convert_to_flexdit(teacher, layout)
    if args.latents:
        dataset = LatentDataset.from_file(args.latents)
    else:
        dataset = LatentDataset.synthetic(teacher, args.synthetic_samples, seed=args.seed)
    model_dir = Path(args.model)
    if (model_dir / "scheduler" / "scheduler_config.json").exists():
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)  # fmt: skip
    losses = distill(student, teacher, dataset, config, scheduler, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(args.output)
        unwrap(accelerator.unwrap_model(student)).save_pretrained(out)
        (out / "distill_log.json").write_text(
            json.dumps({"losses": losses, "config": vars(config)}, indent=1)
        )
        print(f"saved FlexDiT to {out}; loss {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
