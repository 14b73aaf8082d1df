"""Fine-tuning a DyDiT model: distillation from the dense teacher under a FLOPs constraint.

The loss of one batch (latents noised at uniform random timesteps) is

    distill_weight * MSE(student, teacher) + diffusion_weight * MSE(student, target)
        + flops_weight * (mean_b FLOPs_b / dense FLOPs - lambda)^2

with the student run in masked execution and Gumbel-sigmoid straight-through routers (DyDiT's
training), ``target`` the DDPM noise (``objective="ddpm"``) or the rectified-flow velocity
``noise - x0`` (``objective="flow"``: ``x_t = (1 - s) x0 + s noise``, ``t = 1000 s``, as
``FlowMatchEulerDiscreteScheduler`` expects). ``mode="full"`` trains every parameter, ``mode="lora"``
only the routers and the TD-LoRA adapters (the dense weights stay frozen; save them alone with
``save_adapters``). Runs through ``accelerate`` like :func:`mmaccel.diffusion.train.distill`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmaccel.diffusion.dydit import DyDiTTransformer2DModel
from mmaccel.diffusion.train import _model_inputs, unwrap
from mmaccel.runtime.configs import check_floats, check_ints

__all__ = ["DyDiTTrainConfig", "dydit_loss", "train_dydit"]

_MODES = ("full", "lora")
_OBJECTIVES = ("ddpm", "flow")


@dataclass(frozen=True)
class DyDiTTrainConfig:
    """Knobs of :func:`train_dydit`.

    ``router_learning_rate`` applies to the routers (their reference init bias is 15, far from the
    decision boundary, so they need a larger step than the weights); ``label_dropout`` is the
    null-class rate for classifier-free guidance (class-conditional models only).
    """

    steps: int = 1000
    batch_size: int = 8
    mode: str = "full"
    learning_rate: float = 1e-4
    router_learning_rate: float = 1e-2
    weight_decay: float = 0.0
    distill_weight: float = 1.0
    diffusion_weight: float = 0.0
    flops_weight: float = 1.0
    objective: str = "ddpm"
    label_dropout: float = 0.1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_ints(self, ("seed",), 0)
        check_ints(self, ("steps", "batch_size", "gradient_accumulation_steps"), 1)
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {self.objective!r}")
        check_floats(self, ("learning_rate", "router_learning_rate", "max_grad_norm"), positive=True)
        check_floats(self, ("weight_decay", "distill_weight", "diffusion_weight", "flops_weight"), positive=False)
        if self.distill_weight == 0 and self.diffusion_weight == 0:
            raise ValueError("distill_weight and diffusion_weight cannot both be 0")
        if not isinstance(self.label_dropout, (int, float)) or not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be one of 'no', 'fp16', 'bf16', got {self.mixed_precision!r}")


def dydit_loss(
    student: DyDiTTransformer2DModel,
    teacher: ModelMixin,
    batch: dict[str, torch.Tensor],
    config: DyDiTTrainConfig,
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch's loss and its parts (``distill``, ``diffusion``, ``flops``, ``flops_ratio``).

    Random draws (timesteps, noise, label dropout) come from ``generator``; the student must be in
    masked execution (:meth:`~mmaccel.diffusion.dydit.DyDiTTransformer2DModel.training_routers`).
    """
    latents = batch["latents"]
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    if config.objective == "ddpm":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        noisy, target = scheduler.add_noise(latents, noise, t), noise
    else:
        sigma = torch.rand(b, generator=generator).to(device, latents.dtype)
        s = sigma.view(b, 1, 1, 1)
        noisy, target, t = (1 - s) * latents + s * noise, noise - latents, sigma * 1000
    batch = dict(batch)
    if config.label_dropout > 0 and "class_labels" in batch:
        drop = (torch.rand(b, generator=generator) < config.label_dropout).to(device)
        null = torch.full_like(batch["class_labels"], teacher.config.num_embeds_ada_norm)
        batch["class_labels"] = torch.where(drop, null, batch["class_labels"])
    inputs = _model_inputs(teacher, batch, noisy, t)
    pred = student(**inputs).sample
    zero = torch.zeros((), device=device)
    distill = zero
    if config.distill_weight > 0:
        with torch.no_grad():
            reference = teacher(**inputs).sample
        distill = F.mse_loss(pred.float(), reference.float())
    diffusion = F.mse_loss(pred[:, : target.shape[1]].float(), target.float()) if config.diffusion_weight > 0 else zero
    ratio = unwrap(student, DyDiTTransformer2DModel).flops_ratio_from_masks()
    flops = (ratio.mean() - unwrap(student, DyDiTTransformer2DModel).dydit.target_flops_ratio) ** 2
    loss = config.distill_weight * distill + config.diffusion_weight * diffusion + config.flops_weight * flops
    parts = {"distill": distill.item(), "diffusion": diffusion.item(), "flops": flops.item(),
             "flops_ratio": ratio.mean().item(), "loss": loss.item()}  # fmt: skip
    return loss, parts


def _param_groups(student: DyDiTTransformer2DModel, config: DyDiTTrainConfig) -> list[dict[str, Any]]:
    routers = {id(p) for p in student.router_parameters()}
    lora = {id(p) for p in student.lora_parameters()}
    if config.mode == "lora" and not lora:
        raise ValueError("mode='lora' needs TD-LoRA adapters: convert with DyDiTConfig(lora_rank >= 1)")
    student.requires_grad_(config.mode == "full")
    for p in [*student.router_parameters(), *student.lora_parameters()]:
        p.requires_grad_(True)
    weights = [p for p in student.parameters() if p.requires_grad and id(p) not in routers]
    groups = [{"params": [p for p in student.parameters() if id(p) in routers], "lr": config.router_learning_rate}]
    if weights:
        groups.append({"params": weights, "lr": config.learning_rate})
    return groups


def train_dydit(
    student: DyDiTTransformer2DModel,
    teacher: ModelMixin,
    dataset: Dataset,
    config: DyDiTTrainConfig | None = None,
    scheduler: DDPMScheduler | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune ``student`` in place; returns every step's loss parts (see :func:`dydit_loss`).

    Both models run in eval mode (no dropout; DiT's per-block label dropout is replaced by
    ``label_dropout`` applied identically to teacher and student). ``scheduler`` defaults to DiT's
    linear-beta DDPM schedule. On return the student is in pruned execution with fresh caches.
    """
    from accelerate import Accelerator

    config = config or DyDiTTrainConfig()
    if not isinstance(student, DyDiTTransformer2DModel):
        raise TypeError(f"student must be a DyDiTTransformer2DModel, got {type(student).__name__}")
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    torch.manual_seed(config.seed)
    teacher.requires_grad_(False).eval().to(accelerator.device)
    student.eval()
    groups = _param_groups(student, config)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) >= config.batch_size,
                        generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
    model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    generator = torch.Generator().manual_seed(config.seed + 1 + accelerator.process_index)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    logs: list[dict[str, float]] = []
    bar = tqdm(range(config.steps), desc="train DyDiT", disable=not (progress and accelerator.is_local_main_process))
    with student.training_routers(noise=True):
        for _ in bar:
            with accelerator.accumulate(model):
                loss, parts = dydit_loss(model, teacher, next(batches), config, scheduler, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            logs.append(parts)
            bar.set_postfix(loss=f"{parts['loss']:.4g}", flops=f"{parts['flops_ratio']:.3f}")
    if config.gradient_checkpointing:
        student.disable_gradient_checkpointing()
    student.requires_grad_(False)
    student.clear_cache()
    student.stats.reset()
    return logs
