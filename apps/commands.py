"""``mmaccel demo``, ``mmaccel vlm`` and ``mmaccel bench``: parsers and handlers for :mod:`mmaccel.apps.cli`.

Each ``add_*_parser(subparsers)`` adds one command and sets ``func``; user errors raise
``ValueError`` / ``FileNotFoundError`` so ``mmaccel.apps.cli.main`` prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_demo_parser", "add_vlm_parser", "add_bench_parser", "available_benchmarks"]

_BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _model_flag(value: str) -> str:
    """'zoo', 'tiny' or a folder written by ``save_pretrained`` (holding config.json / model_index.json)."""
    folder = Path(value)
    if value not in ("zoo", "tiny") and not (
        (folder / "config.json").is_file() or (folder / "model_index.json").is_file()
    ):
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither 'zoo', 'tiny' nor a folder saved with save_pretrained"
        )
    return value


# ------------------------------------------------------------------------------------------
# mmaccel demo
# ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    from mmaccel.apps.demo import launch
    from mmaccel.apps.demo_tabs import DemoModels

    models = DemoModels(
        vlm=args.vlm_model, dit=args.dit_model, video=args.video_model, ar=args.ar_model, device=args.device
    )
    launch(models, host=args.host, port=args.port, out_dir=args.out_dir, block=True)
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mmaccel demo``: serve the Gradio demo (127.0.0.1 by default)."""
    p = subparsers.add_parser(
        "demo",
        help="serve the Gradio demo: dense vs accelerated for every capability",
        description="Serve the Gradio demo. Models default to the zoo's small trained reference models.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    models = "'zoo' (default: the trained reference model), 'tiny' (random) or"
    p.add_argument("--vlm-model", type=_model_flag, default="zoo", help=f"{models} a LLaVA(-NeXT) folder")
    p.add_argument(
        "--dit-model", type=_model_flag, default="zoo",
        help=f"{models} a DiTPipeline / PixArtAlphaPipeline folder",
    )  # fmt: skip
    p.add_argument("--video-model", type=_model_flag, default="zoo", help=f"{models} a WanPipeline folder")
    p.add_argument("--ar-model", choices=("zoo", "tiny"), default="zoo", help="digits VQ + GPTs, or random tiny")
    p.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="folder for videos / animations (default: a temp folder)"
    )
    p.set_defaults(func=_run_demo)
    return p


# ------------------------------------------------------------------------------------------
# mmaccel vlm
# ------------------------------------------------------------------------------------------


def _run_vlm(args: argparse.Namespace) -> int:
    from mmaccel.runtime import TokenBudget
    from mmaccel.vlm import HiREDConfig, VISTAConfig, load_image, load_vlm

    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image {args.image!r} not found")
    image = load_image(args.image)
    hired = None if args.budget >= 1.0 else HiREDConfig(budget=TokenBudget(ratio=args.budget))
    vista = VISTAConfig(lam=args.vista_lam) if args.vista else None
    if args.model == "tiny":
        from mmaccel.testing import tiny_llava_next

        model, processor = tiny_llava_next(device=args.device)
        vlm = load_vlm(model, processor=processor, hired=hired, vista=vista)
    else:
        if args.model == "zoo":
            from mmaccel.apps.zoo import zoo_path

            args.model = str(zoo_path("shapes-vlm"))
        vlm = load_vlm(args.model, hired=hired, vista=vista, device=args.device)
    out = vlm.generate(image, args.prompt, max_new_tokens=args.max_new_tokens)
    s = out.stats[0]
    print(out.texts[0])
    print(
        f"visual tokens {s.visual_tokens_before} -> {s.visual_tokens_after} ({s.partitions} partitions), "
        f"new tokens {s.new_tokens}, TTFT {s.time_to_first_token_s:.3f} s, "
        f"decode {s.decode_tokens_per_s:.1f} tok/s, peak memory {s.peak_memory_bytes / 2**20:.0f} MiB",
        file=sys.stderr if args.quiet_stats else sys.stdout,
    )
    return 0


def _budget(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {value!r}") from err
    if not 0.0 < ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1] (1 = dense), got {value}")
    return ratio


def add_vlm_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mmaccel vlm``: answer a question about an image with HiRED (and optionally VISTA)."""
    p = subparsers.add_parser(
        "vlm",
        help="answer a question about an image with a visual-token budget (HiRED) and optional VISTA",
        description="Prints the answer, then the visual tokens kept, TTFT and decode speed.",
    )
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument(
        "--budget", type=_budget, default=0.2, help="share of visual tokens kept, (0, 1]; 1 = dense"
    )
    p.add_argument("--vista", action="store_true", help="steer decoding against hallucination (VISTA)")
    p.add_argument("--vista-lam", type=float, default=0.17, help="VISTA steering strength (default 0.17)")
    p.add_argument(
        "--model", type=_model_flag, default="zoo",
        help="'zoo' (default: the trained shapes VLM), 'tiny' (random) or a LLaVA(-NeXT) folder",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--quiet-stats", action="store_true", help="print the stats line on stderr")
    p.set_defaults(func=_run_vlm)
    return p


# ------------------------------------------------------------------------------------------
# mmaccel bench
# ------------------------------------------------------------------------------------------


def available_benchmarks() -> list[str]:
    """Names ``NAME`` of the ``benchmarks/bench_NAME.py`` scripts."""
    return sorted(p.stem.removeprefix("bench_") for p in _BENCH_DIR.glob("bench_*.py"))


def _run_bench(args: argparse.Namespace) -> int:
    names = available_benchmarks()
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; choose from {', '.join(names)}")
    cmd = [sys.executable, "-m", f"benchmarks.bench_{args.name}"]
    cmd += [] if args.full else ["--quick"]
    cmd += ["--write"] if args.write else []
    return subprocess.run(cmd, cwd=_BENCH_DIR.parent, check=False).returncode


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mmaccel bench NAME``: run ``benchmarks.bench_NAME`` (``--quick`` unless ``--full``)."""
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its table",
        description=f"Run benchmarks/bench_NAME.py. NAME is one of: {', '.join(available_benchmarks())}.",
    )
    p.add_argument("name", metavar="NAME", help="benchmark name, e.g. nar")
    p.add_argument("--full", action="store_true", help="full sizes (minutes) instead of --quick")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/results/NAME.md")
    p.set_defaults(func=_run_bench)
    return p
