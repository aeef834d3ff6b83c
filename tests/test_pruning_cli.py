"""`lotus prune`: error paths (one line, exit 2) and small end-to-end runs on a micro ViT with digits data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lotus.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    """A digits config for lotus_vit_micro and a checkpoint of that model (random init, 1 channel, 10 classes)."""
    import timm

    import lotus.models  # noqa: F401 - registers lotus_vit_micro
    from lotus.weights import save_weights

    cfg = tmp_path / "micro.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4},
                "data": {"name": "digits", "batch_size": 32},
            }
        )
    )
    torch.manual_seed(0)
    model = timm.create_model("lotus_vit_micro", img_size=16, patch_size=4, num_classes=10, in_chans=1)
    ckpt = tmp_path / "micro.safetensors"
    save_weights(model, ckpt, {})
    return tmp_path, str(cfg), str(ckpt)


FAST = ["--latency-iters", "0", "--max-eval", "64", "--calib-batches", "1"]


def _err(capsys, argv) -> str:
    assert main(["prune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_error_paths(setup, capsys):
    tmp, cfg, ckpt = setup
    out = str(tmp / "out")
    cases = [
        ([], "pass --model NAME"),
        (["--model", "vit_tiny_patch16_224", "--config", cfg, "--method", "magnitude"], "not both"),
        (["--model", "vit_smal_patch16_224", "--method", "magnitude"], "unknown timm model"),
        (["--config", cfg, "--method", "magnitude", "--sparsity", "1.5"], "--sparsity: expected a number in [0, 1)"),
        (["--config", cfg, "--method", "magnitude", "--sparsity", "-0.1"], "--sparsity"),
        (["--config", cfg, "--method", "structured", "--heads", "1.0"], "would remove every attention head"),
        (["--config", cfg, "--method", "structured"], "pass --heads and/or --mlp"),
        (["--config", cfg, "--method", "magnitude", "--heads", "0.5"], "only used with --method structured"),
        (["--config", cfg, "--checkpoint", str(tmp / "nope.safetensors"), "--method", "magnitude"], "file not found"),
        (["--config", cfg, "--checkpoint", ckpt, "--pretrained", "--method", "magnitude"], "not both"),
        (["--model", "vit_tiny_patch16_224", "--method", "wanda"], "--calib"),
        (["--config", cfg, "--method", "magnitude", "--sweep", "magnitude"], "--method METHOD to prune, or --sweep"),
        (["--config", cfg, "--method", "magnitude", "--scope", "row"], "--scope"),
        (["--config", str(tmp / "missing.yaml"), "--method", "magnitude"], "config file not found"),
        (["--model", "lotus_vit_micro", "--pretrained", "--method", "magnitude"], "pass --checkpoint FILE"),
    ]
    for argv, needle in cases:
        assert needle in _err(capsys, argv + ["--out", out]), argv
    bad = tmp / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    assert "not a readable" in _err(
        capsys, ["--config", cfg, "--checkpoint", str(bad), "--method", "magnitude", "--out", out]
    )
    afile = tmp / "afile"
    afile.write_text("x")
    assert "not a folder" in _err(capsys, ["--config", cfg, "--method", "magnitude", "--out", str(afile)])
    # a checkpoint of another architecture is a one-line error too
    assert "does not fit" in _err(
        capsys,
        [
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "16",
            "--checkpoint",
            ckpt,
            "--method",
            "magnitude",
            "--out",
            out,
        ],
    )


def test_structured_prune_writes_weights_report_and_reloads(setup, capsys):
    tmp, cfg, ckpt = setup
    out = tmp / "thin"
    argv = [
        "--config",
        cfg,
        "--checkpoint",
        ckpt,
        "--method",
        "structured",
        "--heads",
        "0.5",
        "--mlp",
        "0.5",
        "--importance",
        "taylor",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--latency-iters",
        "2",
        "--max-eval",
        "64",
        "--calib-batches",
        "1",
    ]
    assert main(["prune", *argv]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["params_after"] < rep["params_before"]
    assert rep["after"]["flops"] < rep["before"]["flops"]
    assert rep["after"]["params"] == rep["params_after"]
    assert "val_acc" in rep["before"] and "val_acc" in rep["after"]
    assert rep["before"]["latency"]["median_ms"] > 0 and rep["speedup"] > 0
    assert rep["speedup_range"][0] <= rep["speedup"] <= rep["speedup_range"][1] and rep["latency_rounds"] == 2
    assert len(rep["after"]["latency"]["round_ms"]) == 2 and rep["after"]["latency"]["threads"] >= 1
    assert all(w == {"heads": 1, "mlp": 64} for w in rep["widths"].values())
    md = (out / "report.md").read_text()
    assert "heads_after" in md and "before" in md
    # nothing is overwritten without --force
    assert main(["prune", *argv]) == 2
    assert "--force" in capsys.readouterr().err
    # the thinned file reloads (lotus rebuilds the widths) and prunes further
    out2 = tmp / "thin_then_magnitude"
    assert (
        main(
            [
                "prune",
                "--config",
                cfg,
                "--checkpoint",
                str(out / "model.safetensors"),
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--out",
                str(out2),
                *FAST,
            ]
        )
        == 0
    )
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["before"]["params"] == rep["params_after"]
    assert rep2["total"]["sparsity"] == pytest.approx(0.5)
    assert any("no sparse kernel on this device" in n for n in rep2["notes"])


def test_two_four_on_cpu_and_sweep(setup, capsys):
    tmp, cfg, ckpt = setup
    out = tmp / "nm"
    assert (
        main(
            [
                "prune",
                "--config",
                cfg,
                "--checkpoint",
                ckpt,
                "--method",
                "2:4",
                "--score",
                "wanda",
                "--out",
                str(out),
                *FAST,
                "--latency-iters",
                "2",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert "no 2:4 kernels on CPU, masked dense used" in rep["notes"]
    # timed, but masks on dense kernels never claim a speed-up
    assert rep["after"]["latency"]["median_ms"] > 0 and "speedup" not in rep
    assert any("no sparse kernel on this device" in n for n in rep["notes"])
    assert "not reported (no sparse kernel on this device)" in (out / "report.md").read_text()
    assert rep["kernels"]["converted"] == []
    assert rep["total"]["sparsity"] == pytest.approx(0.5)
    from safetensors.torch import load_file

    from pruning.mask_scores import is_nm_sparse

    w = load_file(out / "model.safetensors")
    assert is_nm_sparse(w["blocks.1.mlp.fc2.weight"], 2, 4) and not (w["head.weight"] == 0).any()
    sweep = tmp / "sweep"
    assert (
        main(
            [
                "prune",
                "--config",
                cfg,
                "--checkpoint",
                ckpt,
                "--sweep",
                "magnitude",
                "--sweep-step",
                "0.45",
                "--max-eval",
                "64",
                "--out",
                str(sweep),
            ]
        )
        == 0
    )
    res = json.loads((sweep / "sweep.json").read_text())
    assert [p["sparsity"] for p in res["points"]] == [0.0, 0.45, 0.9]
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "knee" in capsys.readouterr().out
