"""``mmaccel demo``, ``mmaccel vlm`` and ``mmaccel bench``: parsers and handlers for :mod:`mmaccel.apps.cli`.

Each ``add_*_parser(subparsers)`` adds one command and sets ``func``; user errors raise
``ValueError`` / ``FileNotFoundError`` so ``mmaccel.apps.cli.main`` prints one line and exits 2.
``check_vlm_args`` / ``check_demo_args`` hold every check that needs no model, run before any
model loads (and by the fuzz tests). Limits and how to raise them: docs/errors.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmaccel.runtime.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, PIL_MAX_PIXELS
from mmaccel.runtime.limits import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, as_int, check_prompt

__all__ = [
    "add_demo_parser",
    "add_vlm_parser",
    "add_bench_parser",
    "available_benchmarks",
    "check_demo_args",
    "check_vlm_args",
]

_BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

# Classes each --*-model folder may declare (kept in step with mmaccel.apps.demo_tabs.MODEL_CLASSES,
# which tests/test_cli_commands.py checks; not imported here to keep `mmaccel --help` light).
_VLM_MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
_KINDS = {
    "--model": _VLM_MODELS,
    "--vlm-model": _VLM_MODELS,
    "--dit-model": ("DiTPipeline", "PixArtAlphaPipeline"),
    "--video-model": ("WanPipeline",),
}


def model_flag(flag: str) -> Callable[[str], str]:
    """argparse type for ``flag``: 'zoo', 'tiny' or a ``save_pretrained`` folder of the right kind,
    read from its model_index.json / config.json before anything loads."""
    from mmaccel.runtime.paths import model_folder_class

    accepted = _KINDS[flag]

    def parse(value: str) -> str:
        if value in ("zoo", "tiny"):
            return value
        try:
            found = model_folder_class(value) if Path(value).is_dir() else None
        except ValueError as err:  # a broken model_index.json / config.json: say what is wrong
            raise argparse.ArgumentTypeError(str(err)) from None
        if found not in accepted:
            kinds = " or ".join(accepted)
            why = f"it holds a {found}" if found else "no model_index.json / config.json naming a class"
            if not Path(value).is_dir():
                why = "no such folder"
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither 'zoo', 'tiny' nor a folder saved with save_pretrained holding a "
                f"{kinds} ({why})"
            )
        return value

    parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in some messages
    return parse


def _int_in(flag: str, low: int, high: int) -> Callable[[str], int]:
    """argparse type: an int in [low, high], the message naming ``flag`` and the range."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {number}")
        return number

    parse.__name__ = flag.lstrip("-").replace("-", "_")
    return parse


def _device(value: str) -> str:
    """argparse type: 'cpu', 'cuda', 'cuda:N' or 'mps', available on this machine."""
    if value == "cpu":
        return value
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------
# mmaccel demo
# ------------------------------------------------------------------------------------------


def check_demo_args(args: argparse.Namespace) -> Any:
    """Everything ``mmaccel demo`` checks before building a model: the output folder, the limits
    and that ``--host:--port`` can be bound now. Returns the ``DemoLimits``."""
    from mmaccel.apps.demo import check_port
    from mmaccel.apps.demo_tabs import DemoLimits
    from mmaccel.runtime.paths import check_output_dir

    if args.out_dir is not None:
        check_output_dir(args.out_dir, flag="--out-dir")
    limits = DemoLimits(
        max_pixels=args.max_pixels, max_outputs=args.max_outputs, max_output_bytes=args.max_output_mb * 2**20
    )
    check_port(args.host, args.port)
    return limits


def _run_demo(args: argparse.Namespace) -> int:
    from mmaccel.apps.demo import launch, private_upload_folder
    from mmaccel.apps.demo_tabs import DemoModels

    limits = check_demo_args(args)
    models = DemoModels(
        vlm=args.vlm_model, dit=args.dit_model, video=args.video_model, ar=args.ar_model, device=args.device
    )
    uploads = private_upload_folder()
    launch(models, host=args.host, port=args.port, out_dir=args.out_dir, block=True, limits=limits,
           upload_dir=uploads)  # fmt: skip
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
    p.add_argument(
        "--port", type=_int_in("--port", 1, 65535), default=7860,
        help="port (default 7860); a busy port is refused before any model loads",
    )  # fmt: skip
    models = "'zoo' (default: the trained reference model), 'tiny' (random) or"
    p.add_argument(
        "--vlm-model", type=model_flag("--vlm-model"), default="zoo", help=f"{models} a LLaVA(-NeXT) folder"
    )
    p.add_argument(
        "--dit-model", type=model_flag("--dit-model"), default="zoo",
        help=f"{models} a DiTPipeline / PixArtAlphaPipeline folder",
    )  # fmt: skip
    p.add_argument(
        "--video-model", type=model_flag("--video-model"), default="zoo", help=f"{models} a WanPipeline folder"
    )
    p.add_argument("--ar-model", choices=("zoo", "tiny"), default="zoo", help="digits VQ + GPTs, or random tiny")
    p.add_argument("--device", type=_device, default="cpu", help="torch device for the models (default cpu)")
    p.add_argument(
        "--out-dir", type=Path, default=None,
        help="folder for videos / animations (default: a temp folder, deleted at exit)",
    )  # fmt: skip
    p.add_argument(
        "--max-pixels", type=_int_in("--max-pixels", DEFAULT_MIN_SIDE**2, PIL_MAX_PIXELS),
        default=DEFAULT_MAX_PIXELS,
        help=f"largest uploaded image in pixels, read from the header before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )  # fmt: skip
    p.add_argument(
        "--max-outputs", type=_int_in("--max-outputs", 4, 10**6), default=200,
        help="generated files and uploads kept in each folder, oldest deleted first (default 200)",
    )  # fmt: skip
    p.add_argument(
        "--max-output-mb", type=_int_in("--max-output-mb", 1, 10**7), default=1024,
        help="MiB of generated files and uploads kept in each folder (default 1024)",
    )  # fmt: skip
    p.set_defaults(func=_run_demo)
    return p


# ------------------------------------------------------------------------------------------
# mmaccel vlm
# ------------------------------------------------------------------------------------------


def check_vlm_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Everything ``mmaccel vlm`` checks before loading the model: the prompt, the image (size read
    from its header before decoding), the HiRED / VISTA configs. Returns ``(image, hired, vista)``."""
    from mmaccel.runtime import TokenBudget
    from mmaccel.runtime.images import open_image
    from mmaccel.vlm import HiREDConfig, VISTAConfig

    check_prompt(args.prompt, name="--prompt", max_chars=MAX_PROMPT_CHARS)
    as_int("--max-new-tokens", args.max_new_tokens, 1, MAX_NEW_TOKENS)
    hired = None if args.budget >= 1.0 else HiREDConfig(budget=TokenBudget(ratio=args.budget))
    vista = VISTAConfig(lam=args.vista_lam) if args.vista else None
    image = open_image(args.image, max_pixels=args.max_pixels, flag="--max-pixels", name="--image")
    if args.model not in ("zoo", "tiny"):
        from mmaccel.runtime.checkpoint_io import check_weight_files

        check_weight_files(args.model, flag="--model")
    return image, hired, vista


def _run_vlm(args: argparse.Namespace) -> int:
    from mmaccel.vlm import load_vlm

    image, hired, vista = check_vlm_args(args)
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
    p.add_argument(
        "--image", required=True,
        help=f"image file (PNG, JPEG, ...), at least {DEFAULT_MIN_SIDE} px a side and at most --max-pixels",
    )  # fmt: skip
    p.add_argument(
        "--max-pixels", type=_int_in("--max-pixels", DEFAULT_MIN_SIDE**2, PIL_MAX_PIXELS),
        default=DEFAULT_MAX_PIXELS,
        help=f"largest image in pixels, read from the header before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )  # fmt: skip
    p.add_argument("--prompt", required=True, help=f"the question (1 to {MAX_PROMPT_CHARS} characters)")
    p.add_argument(
        "--budget", type=_budget, default=0.2, help="share of visual tokens kept, (0, 1]; 1 = dense"
    )
    p.add_argument("--vista", action="store_true", help="steer decoding against hallucination (VISTA)")
    p.add_argument("--vista-lam", type=float, default=0.17, help="VISTA steering strength (default 0.17)")
    p.add_argument(
        "--model", type=model_flag("--model"), default="zoo",
        help="'zoo' (default: the trained shapes VLM), 'tiny' (random) or a LLaVA(-NeXT) folder",
    )
    p.add_argument(
        "--max-new-tokens", type=_int_in("--max-new-tokens", 1, MAX_NEW_TOKENS), default=32,
        help=f"tokens to generate, 1 to {MAX_NEW_TOKENS} (default 32)",
    )  # fmt: skip
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
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
    cmd = [sys.executable, "-m", f"mmaccel.benchmarks.bench_{args.name}"]  # the bare folder name refuses to load
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
