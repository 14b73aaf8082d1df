"""``mmaccel video --nproc-per-node N``: start the ranks with torch's own launcher, in-process.

``torchrun`` is a separate process: when a rank exits non-zero it prints its own traceback and
failure report and exits 1, whatever the rank said. Launched from here instead (the same
``torch.distributed.launcher.api.elastic_launch`` that ``torchrun --standalone`` uses), a
failure ends as the ranks reported it: a user error is the one line rank 0 printed and exit
status 2; a rank killed by a signal or lost is one line naming it, with the resume command.
"""

from __future__ import annotations

import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from typing import Any

__all__ = ["launch_ranks", "without_flag"]

_LAUNCHER_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            out.append(arg)
    return out


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def launch_ranks(nproc: int, argv: Sequence[str], *, command: str, hint: str | None = None) -> int:
    """Run ``python -m mmaccel.apps.cli ARGV`` on ``nproc`` local ranks; returns the exit status.

    0 when every rank succeeds; otherwise the failing ranks' own status (2 for a user error, which
    rank 0 already printed in one line). A rank killed by a signal adds one line naming it and
    ``hint``. The launcher's logging is silenced: the ranks speak for themselves.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    levels = {name: logging.getLogger(name).level for name in _LAUNCHER_LOGGERS}
    for name in _LAUNCHER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        # what `torchrun --standalone` sets: a private rendezvous on a free local port
        launcher_args = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", uuid.uuid4().hex,
                         "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0"]  # fmt: skip
        config, cmd, cmd_args = config_from_args(parse_args([*launcher_args, "-m", "mmaccel.apps.cli", *argv]))
        try:
            elastic_launch(config, cmd)(*cmd_args)
        except ChildFailedError as err:
            return _report(err.failures, command, hint)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return 0


def _report(failures: dict[int, Any], command: str, hint: str | None) -> int:
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    killed = {rank: code for rank, code in codes.items() if code < 0}
    for rank, code in sorted(killed.items()):
        line = f"{command}: error: rank {rank} was stopped by {_signal_name(code)}"
        print(line + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
    exited = [code for code in codes.values() if code > 0]
    if 2 in exited:
        return 2  # a user error: rank 0 (or the rank that hit it) printed it in one line
    return max(exited) if exited else 1
