"""mmaccel.runtime.distributed: 2- and 3-rank gloo runs on CPU against single-process references.

Ranks are separate spawned processes (not ``torch.multiprocessing.spawn``, which kills every rank
as soon as one exits, and the failure tests need the survivors). Each rank reads the same
launcher environment torchrun sets, runs a module-level worker, and ``torch.save``s what it
returns; the parent compares that with the same computation done in one process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from mmaccel.runtime.distributed import (
    CommError,
    DistContext,
    PipeChannel,
    all_gather_varlen,
    destroy_distributed,
    exchange_neighbours,
    exchange_neighbours_async,
    gather_to_main,
    init_distributed,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CHILD_ENV = {"OMP_NUM_THREADS": "1", **({"GLOO_SOCKET_IFNAME": "lo"} if sys.platform == "linux" else {})}


# ---------------------------------------------------------------- launching ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, worker: Callable[..., Any], args: tuple, out: str
) -> None:
    """Child entry point: launcher env, stderr to a file, run ``worker``, save its result."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    err = os.open(os.path.join(out, f"rank{rank}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    try:
        record: dict[str, Any] = {"result": worker(*args)}
    except Exception as exc:
        record = {"error_type": type(exc).__name__, "error": str(exc), "cause": repr(exc.__cause__)}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: a rank whose peer died must not linger in c10d destructors


def _launch(worker: Callable[..., Any], *args: Any, world_size: int = 2, limit_s: float = 45.0) -> list[dict]:
    """Run ``worker(*args)`` on ``world_size`` gloo ranks; one record per rank (exit code, result or error)."""
    port = _free_port()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        with mock.patch.dict(os.environ, CHILD_ENV):  # inherited by the children before they import torch
            procs = [
                spawn.Process(target=_rank_main, args=(rank, world_size, port, worker, args, out))
                for rank in range(world_size)
            ]
            for proc in procs:
                proc.start()
        deadline = time.monotonic() + limit_s
        records = []
        for rank, proc in enumerate(procs):
            proc.join(max(deadline - time.monotonic(), 0.1))
            record: dict[str, Any] = {"rank": rank, "exitcode": proc.exitcode}
            path = Path(out, f"rank{rank}.pt")
            if path.exists():
                record.update(torch.load(path, weights_only=True))
            err = Path(out, f"rank{rank}.err")
            record["stderr"] = err.read_text(errors="replace") if err.exists() else ""
            records.append(record)
        for proc in procs:
            if proc.is_alive():  # hung past limit_s: end it; its record has no result
                proc.kill()
                proc.join()
    return records


def _results(records: list[dict]) -> list[Any]:
    for record in records:
        assert record["exitcode"] == 0 and "result" in record, record
    return [record["result"] for record in records]


# ---------------------------------------------------------------- per-rank data and references


def _rank_tensor(rank: int, rows: int, cols: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(rows, cols, generator=generator)


def _rows(rank: int) -> int:
    return [3, 0, 5][rank % 3]  # includes an empty rank


def _halo(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first frame, last frame) of a rank's clip: what it sends left and right."""
    clip = _rank_tensor(rank, 4, 2)
    return clip[:1], clip[-1:]


def _stage(rank: int, x: torch.Tensor) -> torch.Tensor:
    return x * (rank + 2) + rank


# ---------------------------------------------------------------- workers (module level: spawn pickles them)


def _helpers_worker() -> dict[str, Any]:
    ctx = init_distributed(backend="gloo", timeout_s=20)
    rank, world = ctx.rank, ctx.world_size
    first, last = _halo(rank)
    out: dict[str, Any] = {
        "ctx": (
            ctx.rank,
            ctx.world_size,
            ctx.local_rank,
            str(ctx.device),
            ctx.backend,
            ctx.group is not None,
        ),
        "is_main": ctx.is_main,
        "exchange": exchange_neighbours(ctx, first, last),
    }
    again = init_distributed(timeout_s=20)  # an initialised group is reused, not re-created
    out["reused"] = again.group is ctx.group and (again.rank, again.backend) == (rank, "gloo")

    # async exchange overlapped with compute, neighbours sending differently shaped tensors
    wide = torch.full((1, rank + 1), float(rank))
    recv_left = torch.empty(1, rank) if rank > 0 else None
    recv_right = torch.empty(1, rank + 2) if rank < world - 1 else None
    handle = exchange_neighbours_async(ctx, wide, wide, recv_left=recv_left, recv_right=recv_right, tag=7)
    busy = _stage(rank, torch.ones(8)).sum()
    from_left, from_right = handle.wait()
    out["exchange_varshape"] = (from_left, from_right, busy)
    out["exchange_buffers_reused"] = (from_left is recv_left, from_right is recv_right)

    # one direction only: data flows right, nothing flows left
    out["exchange_rightward"] = exchange_neighbours(ctx, None, last)

    out["all_gather"] = all_gather_varlen(ctx, _rank_tensor(rank, _rows(rank)))
    out["all_gather_empty"] = all_gather_varlen(ctx, torch.zeros(0, 2))
    out["all_gather_int"] = all_gather_varlen(ctx, torch.arange(rank + 1))
    out["gather"] = gather_to_main(ctx, _rank_tensor(rank, _rows(rank)))
    try:
        all_gather_varlen(ctx, torch.zeros(2, 3 + rank))
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)

    # linear pipeline, 3 micro-batches, next receive posted before computing the current one
    chain = PipeChannel(ctx, (2, 3), torch.float32, num_buffers=2)
    outputs = []
    pending = chain.recv_prev_async() if rank > 0 else None
    for micro in range(3):
        if pending is None:
            x = _rank_tensor(50 + micro, 2)
        else:
            x = pending.wait()
            pending = chain.recv_prev_async() if micro < 2 else None
        y = _stage(rank, x)
        if rank < world - 1:
            chain.send_next(y)
        else:
            outputs.append(y.clone())
    out["pipeline"] = outputs

    # ring: every rank passes its value on; after k steps rank r holds rank (r - k)'s value
    ring = PipeChannel(ctx, (2,), torch.float64, ring=True, tag=3)
    value = torch.tensor([float(rank), 10.0 * rank], dtype=torch.float64)
    seen = []
    for _ in range(world):
        send = ring.send_next_async(value)
        value = ring.recv_prev_async().wait().clone()
        send.wait()
        seen.append(value)
    out["ring"] = seen
    try:
        chain.send_next(torch.zeros(3, 2))
    except (ValueError, RuntimeError) as exc:
        out["bad_send"] = f"{type(exc).__name__}: {exc}"
    destroy_distributed(ctx)
    return out


def _peer_dies_worker(timeout_s: float) -> dict[str, tuple[str | None, float]]:
    """Rank 1 vanishes right after joining; rank 0 then tries each helper with it."""
    ctx = init_distributed(backend="gloo", timeout_s=timeout_s)
    if ctx.rank == 1:
        os._exit(0)  # abrupt: no destroy, no error message
    time.sleep(0.5)  # let the peer's sockets close
    attempts = {
        "exchange": lambda: exchange_neighbours(ctx, torch.ones(2), torch.ones(2)),
        "all_gather": lambda: all_gather_varlen(ctx, torch.ones(2)),
        "pipe_send": lambda: PipeChannel(ctx, (2,)).send_next(torch.ones(2)),
    }
    outcome: dict[str, tuple[str | None, float]] = {}
    for op, attempt in attempts.items():
        start = time.monotonic()
        try:
            attempt()
            outcome[op] = (None, time.monotonic() - start)
        except CommError as exc:
            assert isinstance(exc.__cause__, RuntimeError)  # the backend's error stays chained
            outcome[op] = (str(exc), time.monotonic() - start)
    return outcome


def _peer_hangs_worker(timeout_s: float, done_flag: str) -> dict[str, Any]:
    """Rank 1 stays alive but silent until rank 0 is done; rank 0's exchange must time out."""
    ctx = init_distributed(backend="gloo", timeout_s=timeout_s)
    if ctx.rank == 1:
        give_up = time.monotonic() + 40
        while not os.path.exists(done_flag) and time.monotonic() < give_up:
            time.sleep(0.05)
        os._exit(0)
    start = time.monotonic()
    try:
        exchange_neighbours(ctx, torch.ones(2), torch.ones(2))
        outcome = {"message": None, "elapsed": time.monotonic() - start}
    except CommError as exc:
        outcome = {"message": str(exc), "elapsed": time.monotonic() - start}
    Path(done_flag).touch()
    return outcome


# ---------------------------------------------------------------- single process


@pytest.mark.timeout(30)
def test_world_size_one_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.group, ctx.backend) == (0, 1, None, None)
    assert ctx.is_main and ctx.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.rank = 1  # type: ignore[misc]

    first, last = _halo(0)
    assert exchange_neighbours(ctx, first, last) == (None, None)
    assert exchange_neighbours_async(ctx, first, last).wait() == (None, None)
    x = _rank_tensor(0, 3)
    assert all_gather_varlen(ctx, x) == [x]
    assert gather_to_main(ctx, x) == [x]

    ring = PipeChannel(ctx, (2, 3), ring=True)
    ring.send_next(x[:2])
    received = ring.recv_prev()
    assert torch.equal(received, x[:2]) and received.data_ptr() != x.data_ptr()
    with pytest.raises(RuntimeError, match="before any send"):
        ring.recv_prev()
    chain = PipeChannel(ctx, (2, 3))
    with pytest.raises(RuntimeError, match="no next rank"):
        chain.send_next(x[:2])
    with pytest.raises(RuntimeError, match="no previous rank"):
        chain.recv_prev()

    with pytest.raises(KeyError), ctx.guard():  # single process: the exception just propagates
        raise KeyError("boom")
    destroy_distributed(ctx)

    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1
    monkeypatch.setenv("RANK", "0")
    assert init_distributed().group is None and not torch.distributed.is_initialized()


@pytest.mark.timeout(30)
def test_invalid_arguments_raise_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="backend"):
        init_distributed(backend="mpi")
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(timeout_s=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='nccl'"):
            init_distributed(backend="nccl")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_distributed()
    monkeypatch.delenv("WORLD_SIZE")

    ctx = init_distributed()
    with pytest.raises(ValueError, match="shape"):
        PipeChannel(ctx, (2, -1))
    with pytest.raises(ValueError, match="num_buffers"):
        PipeChannel(ctx, (2,), num_buffers=0)
    ring = PipeChannel(ctx, (2,), torch.float32, ring=True)
    with pytest.raises(ValueError, match=r"expects \(2,\) torch.float32"):
        ring.send_next(torch.zeros(3))
    with pytest.raises(ValueError, match="torch.float64"):
        ring.send_next(torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------- 2 and 3 ranks vs one process


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def helpers_run(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, _results(_launch(_helpers_worker, world_size=world))


@pytest.mark.timeout(60)
def test_context_from_launcher_env(helpers_run: tuple[int, list[dict]]) -> None:
    world, results = helpers_run
    for rank, result in enumerate(results):
        assert result["ctx"] == (rank, world, rank, "cpu", "gloo", True)
        assert result["is_main"] == (rank == 0)
        assert result["reused"]


@pytest.mark.timeout(60)
def test_exchange_neighbours_matches_single_process(helpers_run: tuple[int, list[dict]]) -> None:
    world, results = helpers_run
    halos = [_halo(rank) for rank in range(world)]
    for rank, result in enumerate(results):
        from_left, from_right = result["exchange"]
        if rank == 0:
            assert from_left is None
        else:
            assert torch.equal(from_left, halos[rank - 1][1])  # left neighbour's last frame
        if rank == world - 1:
            assert from_right is None
        else:
            assert torch.equal(from_right, halos[rank + 1][0])  # right neighbour's first frame

        left, right = result["exchange_rightward"]
        assert right is None
        assert (left is None) if rank == 0 else torch.equal(left, halos[rank - 1][1])


@pytest.mark.timeout(60)
def test_exchange_async_with_buffers_of_other_shapes(helpers_run: tuple[int, list[dict]]) -> None:
    world, results = helpers_run
    for rank, result in enumerate(results):
        from_left, from_right, busy = result["exchange_varshape"]
        assert torch.equal(busy, _stage(rank, torch.ones(8)).sum())
        if rank > 0:
            assert torch.equal(from_left, torch.full((1, rank), float(rank - 1)))
        if rank < world - 1:
            assert torch.equal(from_right, torch.full((1, rank + 2), float(rank + 1)))
        assert result["exchange_buffers_reused"] == (True, True)  # the given buffers (None at the edges)


@pytest.mark.timeout(60)
def test_all_gather_varlen_matches_single_process(helpers_run: tuple[int, list[dict]]) -> None:
    world, results = helpers_run
    expected = [_rank_tensor(rank, _rows(rank)) for rank in range(world)]
    for result in results:
        assert [t.shape for t in result["all_gather"]] == [t.shape for t in expected]
        assert all(torch.equal(got, want) for got, want in zip(result["all_gather"], expected))
        assert [t.shape for t in result["all_gather_empty"]] == [torch.Size([0, 2])] * world
        ints = result["all_gather_int"]
        assert [t.tolist() for t in ints] == [list(range(rank + 1)) for rank in range(world)]
        assert all(t.dtype == torch.int64 for t in ints)
        # trailing dims differ per rank: every rank raises the same error instead of hanging
        assert "same dtype and trailing dims" in result["mismatch"]


@pytest.mark.timeout(60)
def test_gather_to_main_matches_single_process(helpers_run: tuple[int, list[dict]]) -> None:
    world, results = helpers_run
    expected = [_rank_tensor(rank, _rows(rank)) for rank in range(world)]
    gathered = results[0]["gather"]
    assert len(gathered) == world
    assert all(torch.equal(got, want) for got, want in zip(gathered, expected))
    assert all(result["gather"] is None for result in results[1:])


@pytest.mark.timeout(60)
def test_pipe_channel_matches_single_process(helpers_run: tuple[int, list[dict]]) -> None:
    world, results = helpers_run
    for micro, got in enumerate(results[-1]["pipeline"]):
        want = _rank_tensor(50 + micro, 2)
        for rank in range(world):
            want = _stage(rank, want)
        assert torch.equal(got, want)
    assert all(result["pipeline"] == [] for result in results[:-1])

    for rank, result in enumerate(results):
        for step, value in enumerate(result["ring"], start=1):
            source = (rank - step) % world
            assert value.tolist() == [float(source), 10.0 * source]
        expected_error = "ValueError: PipeChannel expects (2, 3)" if rank < world - 1 else "no next rank"
        assert expected_error in result["bad_send"]


# ---------------------------------------------------------------- failures: never hang, say why


@pytest.mark.timeout(60)
def test_dead_peer_gives_clear_error_fast() -> None:
    timeout_s = 10.0
    start = time.monotonic()
    records = _launch(_peer_dies_worker, timeout_s)
    assert time.monotonic() - start < 55
    assert records[1]["exitcode"] == 0 and "result" not in records[1]  # died abruptly
    outcome = _results(records[:1])[0]
    described = {
        "exchange": "neighbour exchange with rank 1",
        "all_gather": "all_gather_varlen",
        "pipe_send": "pipeline send to rank 1",
    }
    for op, (message, elapsed) in outcome.items():
        assert message is not None, f"rank 0 did not notice that rank 1 died ({op})"
        assert message.startswith(f"rank 0: {described[op]}")
        assert "a peer process probably died or hung" in message and "Cause: RuntimeError" in message
        assert elapsed < timeout_s + 5


@pytest.mark.timeout(60)
def test_hung_peer_times_out_within_timeout(tmp_path: Path) -> None:
    timeout_s = 3.0
    records = _launch(_peer_hangs_worker, timeout_s, str(tmp_path / "done"), limit_s=50)
    result = _results(records[:1])[0]
    assert result["message"] is not None
    assert re.match(
        r"rank 0: neighbour exchange with rank 1 timed out after [\d.]+s \(timeout 3s\)", result["message"]
    )
    assert timeout_s - 0.5 < result["elapsed"] < timeout_s + 5
    assert "result" not in records[1]


def _torchrun_job(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "job.py"
    script.write_text(
        "import torch\nfrom mmaccel.runtime.distributed import all_gather_varlen, init_distributed\n\n"
        "ctx = init_distributed(backend='gloo', timeout_s=30)\nwith ctx.guard():\n" + textwrap.indent(body, "    ")
    )
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": str(ROOT)}
    for name in LAUNCHER_VARS:
        env.pop(name, None)
    env.pop("MMACCEL_DEBUG", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0"]
    start = time.monotonic()
    proc = subprocess.run([*launcher, *rendezvous, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=55)  # fmt: skip
    return proc, time.monotonic() - start


@pytest.mark.timeout(60)
def test_guard_brings_the_group_down_under_torchrun(tmp_path: Path) -> None:
    body = (
        "if ctx.rank == 1:\n    raise RuntimeError('rank one failed on purpose')\n"
        "all_gather_varlen(ctx, torch.ones(2))\nprint('rank 0 finished', flush=True)\n"
    )
    proc, elapsed = _torchrun_job(tmp_path, body)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "rank 1/2: RuntimeError: rank one failed on purpose" in output and "Traceback" in output
    assert "aborting the process group and exiting with status 1" in output
    assert "rank 0 finished" not in output
    assert elapsed < 55, output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failing", ["ctx.rank == 1", "True"], ids=["one-rank", "every-rank"])
def test_a_user_error_is_one_line_printed_once(tmp_path: Path, failing: str) -> None:
    body = (
        f"if {failing}:\n    raise ValueError('frames must be >= 1, got 0')\n"
        "all_gather_varlen(ctx, torch.ones(2))\nprint('rank 0 finished', flush=True)\n"
    )
    proc, elapsed = _torchrun_job(tmp_path, body)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "frames must be >= 1, got 0" in line and "mmaccel: error" in line]
    assert proc.returncode != 0 and len(lines) == 1, output
    assert ("(rank 1/2)" in lines[0]) == (failing != "True"), lines
    assert "job.py\", line" not in output, output  # no traceback of ours (torchrun's own report remains)
    assert "rank 0 finished" not in output and elapsed < 55, output


def test_single_process_context_ignores_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    ctx = DistContext.single()
    assert (ctx.rank, ctx.world_size, ctx.group, ctx.device.type, ctx.is_main) == (0, 1, None, "cpu", True)
    assert exchange_neighbours(ctx, torch.ones(1), torch.ones(1)) == (None, None)
    with pytest.raises(ValueError, match="timeout_s"):
        DistContext.single(timeout_s=0)
    with pytest.raises(ValueError, match="device"):
        DistContext.single(device="not-a-device")
