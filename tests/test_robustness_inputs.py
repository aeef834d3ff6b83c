"""Bad inputs across the CLI: each gives exit code 2, exactly one ``error:`` line naming the key or file, no
traceback, and leaves every file that existed before (configs, run dirs, checkpoints, tickets) unchanged."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY

from lotus.cli import main

SMALL = copy.deepcopy(TINY)
SMALL["data"].update(limit_train=64, eval_batch_size=256)
SMALL["train"].update(epochs=1)


def _yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _with(**sections) -> dict:
    cfg = copy.deepcopy(SMALL)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Inputs for every case: configs, a finished run, checkpoints, a ticket file, an image folder."""
    import timm
    from PIL import Image

    from lotus.weights import save_weights

    d = tmp_path_factory.mktemp("inputs")
    w = {"dir": d, "tiny": _yaml(d / "tiny.yaml", SMALL)}
    assert main(["train", "--config", str(w["tiny"]), "--out", str(d / "run"), "--quiet"]) == 0
    w["run"] = d / "run"
    w["ckpt"] = d / "run" / "last.safetensors"
    wide = timm.create_model("lotus_vit_micro", num_classes=10, in_chans=1, img_size=16, patch_size=4, embed_dim=32)
    save_weights(wide, d / "wide.safetensors")
    w["wide"] = d / "wide.safetensors"
    (d / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    w["corrupt"] = d / "corrupt.safetensors"
    assert (
        main(
            [
                "select",
                "--config",
                str(w["tiny"]),
                "--policy",
                "random",
                "--fraction",
                "0.5",
                "--out",
                str(d / "half.npz"),
                "--quiet",
            ]
        )
        == 0
    )
    w["ticket"] = d / "half.npz"
    (d / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    w["junk_ticket"] = d / "junk.npz"
    w["other_data"] = _yaml(d / "other.yaml", _with(data={"limit_train": 80}, tickets={"file": str(w["ticket"])}))
    w["txt_ticket"] = _yaml(d / "txt.yaml", _with(tickets={"file": str(d / "half.txt")}))
    w["bad_yaml"] = d / "bad.yaml"
    w["bad_yaml"].write_text("model: {name: lotus_vit_micro\ntrain: [epochs: 1\n")
    w["unknown_key"] = _yaml(d / "unknown.yaml", _with(optim={"lrr": 0.1}))
    w["unquoted"] = d / "unquoted.yaml"
    w["unquoted"].write_text(yaml.safe_dump(SMALL) + "pruning:\n  method: 2:4\n")
    w["narrow"] = _yaml(
        d / "narrow.yaml",
        _with(model={"kwargs": {"embed_dim": 10, "num_heads": 2, "mlp_ratio": 1.0}}, pruning={"method": "2:4"}),
    )
    w["narrow_model"] = _yaml(
        d / "narrow_model.yaml", _with(model={"kwargs": {"embed_dim": 10, "num_heads": 2, "mlp_ratio": 1.0}})
    )
    w["eva_op"] = _yaml(
        d / "eva_op.yaml",
        _with(
            model={
                "name": "eva02_tiny_patch14_224",
                "block": "op",
                "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
            }
        ),
    )
    w["unfused"] = _yaml(
        d / "unfused.yaml",
        _with(
            model={
                "name": "eva02_tiny_patch14_224",
                "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2, "qkv_fused": False},
            },
            tickets={"patches": {"enabled": True, "keep_rate": 0.5}},
        ),
    )
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(d / "images" / split / cls)
            for i in range(4):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / "images" / split / cls / f"{i}.png")
    broken = d / "images" / "train" / "b" / "2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # header intact, pixel data cut off
    w["broken_png"] = broken
    folder = {"name": "imagefolder", "root": str(d / "images"), "batch_size": 4, "limit_train": None}
    w["images"] = _yaml(d / "images.yaml", _with(data=folder))
    (d / "not_a_run").mkdir()
    w["not_a_run"] = d / "not_a_run"
    (d / "prof.json").write_text('{"blocks": ')
    w["bad_profile"] = d / "prof.json"
    w["bad_metrics_run"] = d / "bad_metrics"
    w["bad_metrics_run"].mkdir()
    (w["bad_metrics_run"] / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 1}\n{truncated\n')
    w["bad_summary_run"] = d / "bad_summary"
    w["bad_summary_run"].mkdir()
    (w["bad_summary_run"] / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 1, "step": 2}\n')
    (w["bad_summary_run"] / "summary.json").write_text('{"epochs": 1,')
    return w


def _hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# (id, argv with {placeholders} from the fixture, text the error line must contain)
CASES = [
    # lotus train: config keys, types, ranges, files
    ("unknown key via --set", ["train", "-c", "{tiny}", "--set", "train.epoch=2"], "train.epoch"),
    ("unknown key in file", ["train", "-c", "{unknown_key}"], "optim.lrr"),
    ("wrong type", ["train", "-c", "{tiny}", "--set", "train.epochs=ten"], "train.epochs"),
    ("out of range lr", ["train", "-c", "{tiny}", "--set", "optim.lr=-1"], "optim.lr"),
    ("out of range batch", ["train", "-c", "{tiny}", "--set", "data.batch_size=0"], "data.batch_size"),
    ("unknown data set", ["train", "-c", "{tiny}", "--set", "data.name=imagenet"], "data.name"),
    ("missing config file", ["train", "-c", "{dir}/nope.yaml"], "nope.yaml"),
    ("yaml syntax error", ["train", "-c", "{bad_yaml}"], "bad.yaml"),
    ("--set without =", ["train", "-c", "{tiny}", "--set", "train.epochs"], "--set train.epochs"),
    ("--set into a value", ["train", "-c", "{tiny}", "--set", "train.epochs.x=1"], "--set train.epochs.x=1"),
    (
        "missing checkpoint",
        ["train", "-c", "{tiny}", "--set", "model.checkpoint={dir}/missing.safetensors"],
        "missing.safetensors",
    ),
    ("checkpoint of another width", ["train", "-c", "{tiny}", "--set", "model.checkpoint={wide}"], "wide.safetensors"),
    ("corrupt safetensors", ["train", "-c", "{tiny}", "--set", "model.checkpoint={corrupt}"], "corrupt.safetensors"),
    ("corrupt png in imagefolder", ["train", "-c", "{images}", "--out", "{scratch}/img_run", "--quiet"], "2.png"),
    (
        "ticket of another dataset",
        ["train", "-c", "{other_data}", "--out", "{scratch}/t_run", "--quiet"],
        "tickets.file",
    ),
    ("bad ticket extension", ["train", "-c", "{txt_ticket}"], "tickets.file"),
    ("2:4 unquoted", ["train", "-c", "{unquoted}"], "pruning.method"),
    (
        "2:4 on indivisible widths",
        ["train", "-c", "{narrow}", "--out", "{scratch}/nm_run", "--quiet"],
        'pruning.method: "2:4" needs in_features divisible by 4',
    ),
    ("op block on eva", ["train", "-c", "{eva_op}"], "model.block: op supports timm VisionTransformer"),
    (
        "patch scorer cannot read attention",
        ["train", "-c", "{unfused}", "--out", "{scratch}/u_run", "--quiet"],
        "tickets.patches.scorer",
    ),
    ("unknown model", ["train", "-c", "{tiny}", "--set", "model.name=vit_nano_patch3"], "model.name"),
    (
        "bad optim.extra",
        ["train", "-c", "{tiny}", "--set", "optim.extra={{betaz: 1}}", "--out", "{scratch}/x_run"],
        "optim.extra",
    ),
    ("resume a non-run dir", ["train", "--resume", "{not_a_run}"], "not_a_run"),
    ("resume a missing dir", ["train", "--resume", "{dir}/gone"], "gone"),
    ("out dir holds a run", ["train", "-c", "{tiny}", "--out", "{run}"], "already holds a run"),
    # lotus select
    (
        "select count too large",
        ["select", "-c", "{tiny}", "--policy", "random", "--count", "100000", "--out", "{scratch}/s.npz", "--quiet"],
        "--count",
    ),
    (
        "select bad --out",
        ["select", "-c", "{tiny}", "--policy", "random", "--fraction", "0.5", "--out", "{scratch}/s.txt"],
        "--out",
    ),
    (
        "select --out exists",
        ["select", "-c", "{tiny}", "--policy", "random", "--fraction", "0.5", "--out", "{ticket}"],
        "half.npz",
    ),
    (
        "select corrupt --from-ticket",
        [
            "select",
            "-c",
            "{tiny}",
            "--policy",
            "top",
            "--fraction",
            "0.5",
            "--from-ticket",
            "{junk_ticket}",
            "--out",
            "{scratch}/s.npz",
        ],
        "junk.npz",
    ),
    (
        "select missing checkpoint",
        [
            "select",
            "-c",
            "{tiny}",
            "--scorer",
            "loss",
            "--fraction",
            "0.5",
            "--checkpoint",
            "{dir}/nope.safetensors",
            "--out",
            "{scratch}/s.npz",
        ],
        "nope.safetensors",
    ),
    # lotus prune
    (
        "prune 2:4 on indivisible widths",
        ["prune", "-c", "{narrow_model}", "--method", "2:4", "--latency-iters", "0", "--out", "{scratch}/p1"],
        "--method 2:4 needs in_features divisible by 4",
    ),
    (
        "prune sparsity out of range",
        ["prune", "--model", "lotus_vit_micro", "--method", "magnitude", "--sparsity", "1.5", "--out", "{scratch}/p2"],
        "--sparsity",
    ),
    (
        "prune all heads",
        [
            "prune",
            "-c",
            "{tiny}",
            "--checkpoint",
            "{ckpt}",
            "--method",
            "structured",
            "--heads",
            "0.9",
            "--latency-iters",
            "0",
            "--out",
            "{scratch}/p3",
        ],
        "--heads",
    ),
    (
        "prune corrupt checkpoint",
        ["prune", "-c", "{tiny}", "--checkpoint", "{corrupt}", "--method", "magnitude", "--out", "{scratch}/p4"],
        "corrupt.safetensors",
    ),
    ("prune unknown method", ["prune", "--model", "lotus_vit_micro", "--method", "3:4"], "--method"),
    # lotus bench, report
    ("bench missing config", ["bench", "--configs", "{dir}/nope.yaml", "--out", "{scratch}/b"], "nope.yaml"),
    ("bench seeds 0", ["bench", "--configs", "{tiny}", "--seeds", "0", "--out", "{scratch}/b"], "--seeds"),
    ("report non-run dir", ["report", "{not_a_run}"], "not_a_run"),
    ("report corrupt metrics", ["report", "{bad_metrics_run}"], "metrics.jsonl"),
    ("report corrupt summary", ["report", "{bad_summary_run}"], "summary.json"),
    # lotus outliers, quantcheck
    (
        "outliers missing checkpoint",
        ["outliers", "-c", "{tiny}", "--checkpoint", "{dir}/nope.safetensors"],
        "nope.safetensors",
    ),
    (
        "outliers unknown layer",
        ["outliers", "-c", "{tiny}", "--checkpoint", "{ckpt}", "--layers", "blocks.9", "--out", "{scratch}/o"],
        "--layers",
    ),
    ("quantcheck bits", ["quantcheck", "-c", "{tiny}", "--checkpoint", "{ckpt}", "--bits", "9"], "--bits"),
    ("quantcheck wide checkpoint", ["quantcheck", "-c", "{tiny}", "--checkpoint", "{wide}"], "wide.safetensors"),
    # lotus plan
    ("plan bad budget", ["plan", "-c", "{tiny}", "--memory-budget", "lots"], "--memory-budget"),
    ("plan corrupt profile", ["plan", "--profile", "{bad_profile}", "--memory-budget", "1GiB"], "prof.json"),
    (
        "plan budget in config",
        ["plan", "-c", "{tiny}", "--set", "parallel.memory_budget=much"],
        "parallel.memory_budget",
    ),
]


@pytest.mark.parametrize("argv, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_line_and_keeps_files(ws, tmp_path, capsys, argv, names):
    fields = {k: str(v) for k, v in ws.items()} | {"scratch": str(tmp_path)}
    args = [a.format(**fields) for a in argv]
    before = _hashes(ws["dir"])
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert names in lines[0], err
    assert _hashes(ws["dir"]) == before  # nothing that existed was changed or removed


def test_case_count():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lotus", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    "argv, names",
    [
        (["train", "-c", "{bad_yaml}"], "bad.yaml"),
        (["train", "-c", "{tiny}", "--set", "model.checkpoint={wide}"], "wide.safetensors"),
        (
            ["prune", "-c", "{narrow_model}", "--method", "2:4", "--latency-iters", "0", "--out", "{scratch}/p"],
            "--method",
        ),
        (["report", "{not_a_run}"], "not_a_run"),
    ],
)
def test_process_exit_code_is_2(ws, tmp_path, argv, names):
    fields = {k: str(v) for k, v in ws.items()} | {"scratch": str(tmp_path)}
    before = _hashes(ws["dir"])
    r = _cli(*[a.format(**fields) for a in argv])
    assert r.returncode == 2, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == r.stderr.strip().splitlines()
    assert len(r.stderr.strip().splitlines()) == 1 and names in r.stderr
    assert _hashes(ws["dir"]) == before
