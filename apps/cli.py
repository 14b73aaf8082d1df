"""The ``mmaccel`` command line.

User errors (bad arguments, missing files) print one readable line and exit with code 2;
nothing a user can mistype ends in a stack trace. ``MMACCEL_DEBUG=1`` re-raises them instead.
Under ``torchrun`` / ``accelerate launch`` only rank 0 prints a user error: every rank validates
the same arguments, so the other ranks exit with the same code silently (``MMACCEL_DEBUG=1``
shows every rank's traceback). See docs/errors.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from mmaccel.apps.commands import add_bench_parser, add_demo_parser, add_vlm_parser
from mmaccel.apps.video import add_video_parser
from mmaccel.apps.zoo.cli import add_zoo_parser

__all__ = ["main", "build_parser", "one_line", "OneLineParser"]


def one_line(message: object) -> str:
    """``message`` as a single line (newlines folded into ``"; "``)."""
    return "; ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line: ``PROG: error: MESSAGE (see PROG --help)``.

    Sub-command parsers inherit the class (``add_subparsers`` uses the parent's type).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _reports_errors() -> bool:
    """True on the rank that prints user errors: rank 0, or a single process."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _cmd_info(args: argparse.Namespace) -> int:
    from mmaccel.runtime.environment import device_summary, library_versions, probe_backends

    report = {
        "versions": library_versions(),
        "device": device_summary(),
        "backends": [b.to_dict() for b in probe_backends(compile_flex=not args.no_compile)],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("mmaccel environment")
    print("  versions:")
    for name, version in report["versions"].items():
        print(f"    {name:<13} {version or 'not installed'}")
    dev = report["device"]
    print(f"  device:      {dev['device']} ({dev['cpu']}, {dev['threads']} threads)")
    for i, name in enumerate(dev["cuda_devices"]):
        print(f"    cuda:{i}      {name}")
    print("  backends:")
    for b in report["backends"]:
        print(f"    {b['name']:<26} {'usable' if b['usable'] else 'unusable'}  ({b['detail']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mmaccel", description="Fast multimodal understanding and visual generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser("info", help="versions, device and usable backends")
    info.add_argument("--json", action="store_true", help="print a JSON report")
    info.add_argument("--no-compile", action="store_true", help="skip the compiled flex_attention probe")
    info.set_defaults(func=_cmd_info)

    add_video_parser(sub)
    add_demo_parser(sub)
    add_vlm_parser(sub)
    add_bench_parser(sub)
    add_zoo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `video --nproc-per-node` relaunches
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("MMACCEL_DEBUG"):
            raise
        if _reports_errors():
            print(f"mmaccel {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"mmaccel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
