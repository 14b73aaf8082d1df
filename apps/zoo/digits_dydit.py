"""Digits DyDiT: the zoo's digits-dit fine-tuned into DyDiT at lambda 0.5 and 0.7.

Starts from the committed ``digits-dit`` pipeline (teacher and initialisation), converts its
``DiTTransformer2DModel`` with :func:`mmaccel.diffusion.dydit.convert_to_dydit` and fine-tunes it
(:func:`mmaccel.diffusion.dydit_train.train_dydit`: distillation from the dense teacher plus the
FLOPs loss toward lambda) on the VAE latents of the 1,437 training digits. The folder holds one
``DyDiTTransformer2DModel`` per lambda (``lambda-0.5/``, ``lambda-0.7/``, safetensors); the VAE
and scheduler are digits-dit's.

    from mmaccel.apps.zoo import digits_dydit
    pipe = digits_dydit.load(target=0.7)      # a DiTPipeline whose transformer is the DyDiT model
    images = pipe(pipe.get_label_ids(["three"]), num_inference_steps=20, output_type="pt").images
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mmaccel.apps.zoo import digits_dit
from mmaccel.apps.zoo.digits import digit_images, digit_split, load_digit_classifier

__all__ = ["NAME", "TARGETS", "load", "train", "train_one"]

NAME = "digits-dydit"
#: lambda values of the committed models (subfolders ``lambda-<value>``)
TARGETS = (0.5, 0.7)
# Our zoo recipe (not the reference init): router biases near the decision boundary so that a
# short CPU fine-tune can move them; the reference's 15 / 35 need far more steps.
_DYDIT = dict(router_init_bias=1.0, token_router_init_bias=1.0)
_TRAIN = dict(batch_size=32, learning_rate=3e-4, router_learning_rate=1e-2, distill_weight=1.0,
              diffusion_weight=0.0, flops_weight=1.0, label_dropout=0.1)  # fmt: skip


def _check_target(target: float) -> float:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target


def load(target: float = 0.7, path: str | Path | None = None, *, device: str | torch.device = "cpu"):
    """digits-dit's pipeline with the DyDiT transformer of ``target`` (lambda) swapped in."""
    from mmaccel.apps.zoo import zoo_path
    from mmaccel.diffusion.dydit import DyDiTTransformer2DModel

    _check_target(target)
    root = zoo_path(NAME) if path is None else Path(path)
    pipe = digits_dit.load(device=device)
    pipe.transformer = DyDiTTransformer2DModel.from_pretrained(str(root / f"lambda-{target}")).eval().to(device)
    return pipe


def _latent_dataset(pipe):
    from mmaccel.diffusion.train import LatentDataset

    images, labels = digit_images(32)
    train_idx, _ = digit_split()
    with torch.no_grad():
        mean = pipe.vae.encode(images[train_idx] * 2 - 1).latent_dist.mean
    return LatentDataset({"latents": mean, "class_labels": labels[train_idx]})


def train_one(
    target: float, output: Path, *, steps: int = 400, seed: int = 0, progress: bool = True,
    eval_samples_per_class: int = 20, teacher_pipe=None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune one lambda into ``output`` (a transformer folder); returns its metrics."""
    from mmaccel.diffusion.dydit import DyDiTConfig, convert_to_dydit
    from mmaccel.diffusion.dydit_train import DyDiTTrainConfig, train_dydit

    _check_target(target)
    start, cpu = time.perf_counter(), time.process_time()
    pipe = teacher_pipe or digits_dit.load()
    teacher = pipe.transformer
    student = convert_to_dydit(teacher, DyDiTConfig(target_flops_ratio=target, **_DYDIT))
    logs = train_dydit(student, teacher, _latent_dataset(pipe),
                       DyDiTTrainConfig(steps=steps, seed=seed, **_TRAIN), progress=progress)  # fmt: skip
    train_cpu = time.process_time() - cpu
    student.save_pretrained(output)
    clf = load_digit_classifier()
    student.stats.reset()
    pipe.transformer = student
    try:
        metrics = digits_dit.evaluate(pipe, samples_per_class=eval_samples_per_class, seed=seed, classifier=clf)
    finally:
        pipe.transformer = teacher
    summary = student.stats.summary()
    tail = logs[-max(1, steps // 10) :]
    return {
        "lambda": target,
        **metrics,
        "sampling FLOPs ratio vs dense": summary["flops_ratio"],
        "active heads / MLP channels / MLP tokens": f"{summary['active_head_fraction']:.3f} / "
        f"{summary['active_channel_fraction']:.3f} / {summary['active_token_fraction']:.3f}",
        "final distill loss (last 10%)": sum(r["distill"] for r in tail) / len(tail),
        "final training FLOPs ratio (last 10%)": sum(r["flops_ratio"] for r in tail) / len(tail),
        "steps": steps,
        "training CPU seconds": round(train_cpu, 1),
        "wall seconds": round(time.perf_counter() - start, 1),
    }


def train(output: Path, *, seed: int = 0, progress: bool = True, steps: int = 400,
          eval_samples_per_class: int = 20) -> dict[str, Any]:  # fmt: skip
    """Fine-tune both lambdas into ``output/lambda-*``, measure the dense model on the same noise,
    write the model card; returns the metrics."""
    from mmaccel.apps.zoo.card import write_model_card

    start = time.perf_counter()
    output = Path(output)
    pipe = digits_dit.load()
    dense = digits_dit.evaluate(pipe, samples_per_class=eval_samples_per_class, seed=seed)
    metrics: dict[str, Any] = {f"dense {k}": v for k, v in dense.items()}
    for target in TARGETS:
        result = train_one(target, output / f"lambda-{target}", steps=steps, seed=seed, progress=progress,
                           eval_samples_per_class=eval_samples_per_class, teacher_pipe=pipe)  # fmt: skip
        metrics.update({f"lambda {target}: {k}": v for k, v in result.items() if k != "lambda"})
    write_model_card(
        output,
        name=NAME,
        summary="digits-dit fine-tuned into DyDiT (timestep-wise dynamic width + spatial-wise dynamic tokens) "
        "at FLOPs targets lambda 0.5 and 0.7. Load with `mmaccel.apps.zoo.digits_dydit.load(target=0.7)` "
        "(digits-dit's DiTPipeline with the DyDiT transformer).",
        architecture="`DyDiTTransformer2DModel` around digits-dit's DiT (6 blocks, 4 heads x 24, 8x8 tokens): "
        "per block a head router (4 groups) and an MLP router (4 groups of 96 channels) on the timestep "
        "embedding, and a token router (96 -> 6 -> 1) deciding which tokens skip the MLP.",
        data="VAE posterior means of the 1,437 training digits of `digit_split()` with their labels.",
        training=f"From digits-dit; {steps} AdamW steps per lambda, batch {_TRAIN['batch_size']}, lr "
        f"{_TRAIN['learning_rate']} (routers {_TRAIN['router_learning_rate']}), loss = MSE to the dense "
        "teacher + (FLOPs ratio - lambda)^2, Gumbel-sigmoid straight-through routers (tau 5), 10% null "
        f"labels, router biases initialised at {_DYDIT['router_init_bias']}. torch threads: "
        f"{torch.get_num_threads()}. Metrics: DPM-Solver++ 20 steps, guidance 2, "
        f"{10 * eval_samples_per_class} samples from the same seeds as the dense row.",
        metrics=metrics,
        seed=seed,
        train_seconds=time.perf_counter() - start,
        limitations="Only the ten digit classes at 32x32; accuracy and FD come from the zoo's small classifier. "
        "FLOP savings on this 64-token model are real but the wall-clock gain is small (tiny matrices).",
    )
    return metrics
