"""``mmaccel demo | vlm | bench``: help, small real runs, and one-line user errors with exit code 2."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import mmaccel.apps.cli as cli
from mmaccel.apps.commands import add_bench_parser, add_demo_parser, add_vlm_parser, available_benchmarks
from mmaccel.testing import tiny_image

ROOT = Path(__file__).resolve().parent.parent
_ADDERS = {"demo": add_demo_parser, "vlm": add_vlm_parser, "bench": add_bench_parser}


def _wired_parser(original):
    """``mmaccel.apps.cli.build_parser`` plus these commands where apps/cli.py does not add them yet."""

    def build() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, add in _ADDERS.items():
            if name not in sub.choices:
                add(sub)
        return parser

    return build


# The same wiring for subprocesses (python -c), so `mmaccel demo` runs as a real process.
_WIRED_MAIN = (
    "import sys, mmaccel.apps.cli as cli; from tests.test_cli_commands import _wired_parser; "
    "cli.build_parser = _wired_parser(cli.build_parser); sys.exit(cli.main(sys.argv[1:]))"
)


@pytest.fixture
def mmaccel(monkeypatch):
    monkeypatch.setattr(cli, "build_parser", _wired_parser(cli.build_parser))
    return cli.main


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cat.png"
    tiny_image(128, 128, seed=2).save(path)
    return path


@pytest.mark.parametrize("command", ["demo", "vlm", "bench"])
def test_help(mmaccel, capsys, command):
    with pytest.raises(SystemExit) as exc:
        mmaccel([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mmaccel {command}")


def test_vlm_runs_and_prints_answer_and_stats(mmaccel, capsys, image_path):
    assert mmaccel(["vlm", "--image", str(image_path), "--prompt", "What is it?", "--budget", "0.2",
                    "--vista", "--max-new-tokens", "3", "--model", "tiny"]) == 0  # fmt: skip
    answer, stats = capsys.readouterr().out.strip().splitlines()[-2:]
    assert answer
    before, after = (int(x) for x in stats.split("visual tokens ")[1].split(" (")[0].split(" -> "))
    assert after < before and "TTFT" in stats and "tok/s" in stats


def test_vlm_full_budget_keeps_every_token(mmaccel, capsys, image_path):
    assert (
        mmaccel(
            ["vlm", "--image", str(image_path), "--prompt", "hi", "--budget", "1", "--max-new-tokens", "2",
             "--model", "tiny"]
        )
        == 0
    )
    stats = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = stats.split("visual tokens ")[1].split(" (")[0].split(" -> ")
    assert before == after


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["vlm", "--image", "/no/such.png", "--prompt", "hi"],
            "mmaccel vlm: error: --image '/no/such.png' not found",
        ),
        (["vlm", "--image", "IMG", "--prompt", "hi", "--budget", "0"], "budget must be in (0, 1]"),
        (["vlm", "--image", "IMG", "--prompt", "hi", "--model", "/no/model"], "neither 'zoo', 'tiny' nor a folder"),
        (["bench", "no_such_bench"], "unknown benchmark 'no_such_bench'; choose from"),
        (["demo", "--vlm-model", "/no/model"], "neither 'zoo', 'tiny' nor a folder"),
        (["demo", "--dit-model", "EMPTY"], "neither 'zoo', 'tiny' nor a folder"),
    ],
)
def test_user_errors_are_one_line_exit_2(mmaccel, capsys, image_path, argv, message):
    empty = image_path.parent / "empty"
    empty.mkdir(exist_ok=True)
    argv = [{"IMG": str(image_path), "EMPTY": str(empty)}.get(a, a) for a in argv]
    try:
        code = mmaccel(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_unreadable_image_is_a_user_error(mmaccel, capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert mmaccel(["vlm", "--image", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmaccel vlm: error: cannot read --image") and len(err.strip().splitlines()) == 1


def test_bench_lists_the_benchmark_scripts():
    names = available_benchmarks()
    assert "nar" in names and "hired" in names
    assert all((ROOT / "benchmarks" / f"bench_{n}.py").is_file() for n in names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serves_on_localhost(tmp_path):
    port = _free_port()
    env_cmd = [sys.executable, "-c", _WIRED_MAIN, "demo", "--port", str(port), "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(env_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    page = resp.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"demo did not start: {proc.communicate()[0][-2000:]}")
                time.sleep(0.5)
        assert "mmaccel demo" in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_bench_runs_quick_benchmark_and_prints_table(mmaccel, capfd):
    assert mmaccel(["bench", "nar"]) == 0
    rows = [line for line in capfd.readouterr().out.splitlines() if line.startswith("|")]
    assert any("| raster |" in r for r in rows) and any("| nar |" in r for r in rows)


def test_demo_torchrun_command_parses_with_the_video_cli():
    import shlex

    from mmaccel.apps.demo_tabs import torchrun_command

    argv = shlex.split(torchrun_command(prompt="a 'quoted' car", frames=17))
    assert argv[:3] == ["torchrun", "--nproc-per-node", "2"]
    args = cli.build_parser().parse_args(argv[argv.index("mmaccel.apps.cli") + 1 :])
    assert (args.command, args.prompt, args.frames, args.mode) == ("video", "a 'quoted' car", 17, "clip")


def test_model_flag_kinds_match_the_demo():
    """apps/commands.py keeps its own copy of the accepted classes (to keep `mmaccel --help` light)."""
    from mmaccel.apps import commands
    from mmaccel.apps.demo_tabs import MODEL_CLASSES

    for name, classes in MODEL_CLASSES.items():
        assert commands._KINDS[f"--{name}-model"] == classes
    assert commands._KINDS["--model"] == MODEL_CLASSES["vlm"]
