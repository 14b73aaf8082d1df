"""diffusers' Ulysses context parallelism on 2 gloo ranks (CPU), dense and with SVG2 (issue #17).

diffusers' ``enable_parallelism`` assumes an accelerator. On CPU with gloo it runs once
``torch._C._get_accelerator`` returns ``cpu`` and ``torch.accelerator.device_count`` returns 1:
that two-line shim lives in the rank worker below and is test-only (on GPUs nothing is shimmed).
Ranks are spawned processes with a deadline, as in tests/test_distributed.py.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from mmaccel.sparse_attn import SVG2Config, apply_svg2
from mmaccel.testing import tiny_wan_pipeline

CHILD_ENV = {"OMP_NUM_THREADS": "1", **({"GLOO_SOCKET_IFNAME": "lo"} if sys.platform == "linux" else {})}
#: half the layers dense (through dispatch, so diffusers' own Ulysses path), half SVG2-sparse
SVG2 = SVG2Config(num_q_clusters=6, num_k_clusters=9, top_p=0.5, min_kc_ratio=0.0, dense_steps=0.0,
                  dense_layers=0.5, backend="masked")  # fmt: skip


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 12, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g))  # fmt: skip


@torch.no_grad()
def _forward(model):
    return model(**_inputs(), return_dict=False)[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_accelerator_shim() -> None:
    """Test-only: let diffusers' context parallelism build its device mesh on CPU."""
    torch._C._get_accelerator = lambda: torch.device("cpu")
    torch.accelerator.device_count = lambda: 1


def _worker(order: str) -> dict[str, Any]:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    _cpu_accelerator_shim()
    dist.init_process_group("gloo")
    try:
        model = tiny_wan_pipeline().transformer
        result: dict[str, Any] = {}
        if order == "svg2-first":
            handle = apply_svg2(model, SVG2)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        else:
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
            result["dense"] = _forward(model)
            handle = apply_svg2(model, SVG2)
        assert all(p._parallel_config is not None for p in handle.processors)
        result["svg2"] = _forward(model)
        result["summary"] = handle.stats.summary()
        handle.remove()
        result["removed"] = _forward(model)
        return result
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, port: int, order: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    err = os.open(os.path.join(out, f"rank{rank}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    try:
        record: dict[str, Any] = {"result": _worker(order)}
    except Exception as exc:
        record = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    os._exit(0)


def _launch(order: str, limit_s: float = 90.0) -> list[dict[str, Any]]:
    port, spawn = _free_port(), multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        with mock.patch.dict(os.environ, CHILD_ENV):
            procs = [spawn.Process(target=_rank_main, args=(rank, port, order, out)) for rank in range(2)]
            for proc in procs:
                proc.start()
        deadline = time.monotonic() + limit_s
        results = []
        for rank, proc in enumerate(procs):
            proc.join(max(deadline - time.monotonic(), 0.1))
            path = Path(out, f"rank{rank}.pt")
            record = torch.load(path, weights_only=True) if path.exists() else {}
            err = Path(out, f"rank{rank}.err")
            stderr = err.read_text(errors="replace")[-2000:] if err.exists() else ""
            assert "result" in record, f"rank {rank}: {record.get('error', 'no result (hung?)')}\n{stderr}"
            results.append(record["result"])
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


@pytest.fixture(scope="module")
def references():
    model = tiny_wan_pipeline().transformer
    dense = _forward(model)
    with apply_svg2(model, SVG2) as handle:
        sparse = _forward(model)
        assert handle.stats.summary()["sparse_density"] < 1
    assert not torch.allclose(sparse, dense, atol=1e-3)
    return dense, sparse


@pytest.mark.timeout(150)
@pytest.mark.parametrize("order", ["parallel-first", pytest.param("svg2-first", marks=pytest.mark.slow)])
def test_svg2_under_ulysses_equals_one_process(references, order):
    dense, sparse = references
    for rank, result in enumerate(_launch(order)):
        if "dense" in result:  # diffusers' own Ulysses on the tiny Wan equals one process
            torch.testing.assert_close(result["dense"], dense, rtol=0, atol=1e-5)
        torch.testing.assert_close(result["svg2"], sparse, rtol=0, atol=1e-5, msg=f"rank {rank}")
        assert result["summary"]["sparse_calls"] == 2 and result["summary"]["dense_calls"] == 2
        torch.testing.assert_close(result["removed"], dense, rtol=0, atol=1e-5)


def test_ring_attention_is_refused():
    from diffusers import ContextParallelConfig

    from mmaccel.sparse_attn.svg2 import _ulysses

    class Parallel:
        context_parallel_config = ContextParallelConfig(ring_degree=2)

    with pytest.raises(NotImplementedError, match="ring"):
        _ulysses(Parallel())
