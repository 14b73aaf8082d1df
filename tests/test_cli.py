import json
import subprocess
import sys

import pytest

from mmaccel.apps.cli import main


def test_info_json(capsys):
    assert main(["info", "--json", "--no-compile"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"]
    assert report["device"]["device"] in {"cpu", "cuda"}
    names = {b["name"] for b in report["backends"]}
    assert {"cuda", "xformers"} <= names
    cuda = next(b for b in report["backends"] if b["name"] == "cuda")
    import torch

    assert cuda["usable"] == torch.cuda.is_available()


def test_info_text_and_flex_probe(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "flex_attention (compiled)" in out and "xformers" in out


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_console_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "mmaccel.apps.cli", "info", "--no-compile"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "mmaccel environment" in out.stdout


def test_video_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["video", "--help"])
    assert exc.value.code == 0
    assert "torchrun" in capsys.readouterr().out


def test_video_user_error_is_one_line(capsys):
    # 10 frames is not 1 + 4k for the Wan VAE: a user error, exit code 2, no traceback
    assert main(["video", "--model", "tiny", "--prompt", "a car", "--frames", "10", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmaccel video: error:") and "Traceback" not in err


def test_debug_env_reraises(monkeypatch):
    monkeypatch.setenv("MMACCEL_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["video", "--model", "tiny", "--prompt", "a car", "--frames", "10", "--steps", "1", "--quiet"])
