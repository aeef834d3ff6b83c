import json
import subprocess
import sys

import pytest

from lotus.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lotus", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "--set" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "nope.yaml"], "nope.yaml: config file not found"),
        (["train"], "pass exactly one of --config FILE or --resume RUN_DIR"),
        (["train", "--resume", "no_such_run"], "no_such_run is not a run directory"),
        (
            ["train", "--config", "configs/digits.yaml", "--set", "train.epochs=ten"],
            "train.epochs: expected int >= 1, got 'ten'",
        ),
        (["train", "--config", "configs/digits.yaml", "--set", "model.name=vit_tiny_patch16_22"], "unknown timm model"),
        (
            ["train", "--config", "configs/digits.yaml", "--set", "model.checkpoint=missing.safetensors"],
            "model.checkpoint: file not found",
        ),
        (
            [
                "train",
                "--config",
                "configs/digits.yaml",
                "--set",
                "data.name=cifar10",
                "--set",
                "data.root=/nonexistent",
            ],
            "set data.download: true",
        ),
        (["train", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_usage_error_exit_code():
    r = run_cli("train", "--bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_pretrained_offline_is_clear(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "train",
            "--config",
            "configs/digits.yaml",
            "--set",
            "model.name=vit_tiny_patch16_224",
            "--set",
            "model.pretrained=true",
            "--set",
            "train.epochs=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot download pretrained weights for vit_tiny_patch16_224" in err
    assert "pass model.checkpoint" in err


def test_corrupt_checkpoint_and_corrupt_state(tmp_path, tiny_yaml, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    assert main(["train", "--config", str(tiny_yaml), "--set", f"model.checkpoint={bad}"]) == 2
    assert "not a readable" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(tiny_yaml.read_text())
    (run / "state.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run)]) == 2
    assert "corrupt or not a Lotus training state" in capsys.readouterr().err


def test_train_and_resume_cli(tmp_path, tiny_yaml):
    out = tmp_path / "run"
    r = run_cli("train", "--config", str(tiny_yaml), "--set", "train.epochs=1", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(out), "--set", "train.epochs=2", "--quiet")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in recs if x["type"] == "epoch"] == [1, 2]
    r = run_cli("train", "--config", str(tiny_yaml), "--out", str(out), "--quiet")
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_pretrained_without_network_fails_fast_in_one_line(monkeypatch, capsys):
    """No HF_HUB_OFFLINE, but the hub unreachable: one line within seconds, not minutes of retries."""
    import socket
    import time

    def unreachable(*a, **kw):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    t0 = time.perf_counter()
    code = main(
        [
            "train",
            "--config",
            "configs/digits.yaml",
            "--set",
            "model.name=vit_tiny_patch16_224",
            "--set",
            "model.pretrained=true",
            "--set",
            "train.epochs=1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not in the local hub cache" in err[0] and "model.checkpoint" in err[0]
    assert time.perf_counter() - t0 < 5
