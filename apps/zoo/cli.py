"""``mmaccel zoo list | path NAME | train NAME``: the reference zoo from the command line."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mmaccel.apps.zoo import REGISTRY, ZOO_DIR, train_model, zoo_path

__all__ = ["add_zoo_parser"]


def _cmd_list(args: argparse.Namespace) -> int:
    for name in REGISTRY:
        folder = ZOO_DIR / name
        files = list(folder.rglob("*.safetensors"))
        size = sum(f.stat().st_size for f in files) / 2**20
        state = f"{size:6.2f} MB" if files else "not trained"
        print(f"{name:<18} {state}  {folder}")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    print(zoo_path(args.name))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.output is not None:  # before training, not after minutes of it
        from mmaccel.runtime.paths import check_output_dir

        check_output_dir(args.output, flag="--output")
    start = time.perf_counter()
    metrics = train_model(args.name, output=args.output, seed=args.seed, progress=not args.quiet)
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"model": args.name, "seconds": seconds, **metrics}, indent=2, default=str))
    return 0


def add_zoo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mmaccel zoo``: list the reference models, print a model's folder, or retrain one."""
    p = subparsers.add_parser(
        "zoo",
        help="small trained reference models: list, path, train",
        description="Small reference models trained on CPU (testing and demonstration only).",
    )
    sub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    sub.required = True
    sub.add_parser("list", help="the models, their size and folder").set_defaults(func=_cmd_list)
    path = sub.add_parser("path", help="print a model's folder (for from_pretrained)")
    path.add_argument("name", choices=list(REGISTRY))
    path.set_defaults(func=_cmd_path)
    train = sub.add_parser("train", help="train a model from scratch (default: into its zoo folder)")
    train.add_argument("name", choices=list(REGISTRY))
    train.add_argument("--output", default=None, help="folder to write (default: the zoo folder)")
    train.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed (default: the committed weights' seed, 0 unless the entry names another)",
    )
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)
    return p
