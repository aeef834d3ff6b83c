"""The LOTUS schedule under torchrun (2 processes, gloo, CPU): dynamic data pruning, structured thinning and
gradual Wanda masks under DDP (through ``parallel.mode: auto``, which re-plans after thinning) and FSDP2,
against one process with the same global batch, and resuming a thinned 2-rank run on 2 ranks and on 1.

configs/digits_lotus.yaml shortened: lotus_vit_micro, 256 samples, 4 epochs, thinning at epoch 2, Wanda masks
ramping to 50% from epoch 2.5 to 3.5 (sharded calibration), no augmentation (each rank would draw different
augmentations than one process). Global batch 32 (16 per rank).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CFG = {
    "base": str(ROOT / "configs" / "digits_lotus.yaml"),
    "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4},
    "data": {
        "limit_train": 256,
        "batch_size": 16,
        "eval_batch_size": 128,
        "augment": {"random_crop": 0, "rotate": 0, "scale": 0},
    },
    "train": {"epochs": 4, "warmup_epochs": 0.5, "threads": 1},
    "pruning": {
        "structured": {"at_epoch": 2},
        "method": "wanda",
        "schedule": "gradual",
        "sparsity": 0.5,
        "start_epoch": 2.5,
        "end_epoch": 3.5,
        "frequency": 2,
    },
    "schedule": {"anneal_epochs": 1},
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "lotus",
        "train",
        *args,
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _epochs(run: Path) -> list[dict]:
    return [r for r in _records(run) if r.get("type") == "epoch"]


def _event(run: Path, name: str) -> dict:
    found = [r for r in _records(run) if r.get("event") == name]
    assert len(found) == 1, (name, found)
    return found[0]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "last.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (global batch 32), a 2-rank auto/DDP run stopped after epoch 3 (thinned at 2) and resumed
    on 2 ranks and on 1 (mid mask ramp), and a 2-rank FSDP2 run."""
    from lotus.cli import main

    tmp = tmp_path_factory.mktemp("lotus_dist")
    cfg = tmp / "lotus.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    out = {"single": tmp / "single", "auto": tmp / "auto", "fsdp": tmp / "fsdp"}
    assert (
        main(["train", "--config", str(cfg), "--set", "data.batch_size=32", "--out", str(out["single"]), "--quiet"])
        == 0
    )
    stop = _epochs(out["single"])[2]["step"]  # the optimizer step at the end of epoch 3 (same global batches)
    _torchrun(
        "--config",
        str(cfg),
        "--set",
        "parallel.mode=auto",
        "--set",
        "parallel.memory_budget=1GiB",
        "--set",
        f"train.max_steps={stop}",
        "--out",
        str(out["auto"]),
    )
    out["resumed2"], out["resumed1"] = tmp / "resumed2", tmp / "resumed1"
    shutil.copytree(out["auto"], out["resumed2"])
    shutil.copytree(out["auto"], out["resumed1"])
    _torchrun("--resume", str(out["resumed2"]), "--set", "train.max_steps=1000")
    assert (
        main(
            [
                "train",
                "--resume",
                str(out["resumed1"]),
                "--set",
                "train.max_steps=1000",
                "--set",
                "parallel.mode=none",
                "--set",
                "data.batch_size=32",
                "--quiet",
            ]
        )
        == 0
    )
    _torchrun("--config", str(cfg), "--set", "parallel.mode=fsdp", "--out", str(out["fsdp"]))
    return out


def _same_digests(digests: list) -> None:
    assert isinstance(digests, list) and len(digests) == 2 and digests[0] == digests[1], digests


def test_auto_ddp_lotus_matches_one_process_and_replans(runs):
    single, auto = _epochs(runs["single"]), _epochs(runs["auto"])
    assert len(auto) == 3
    kept = [r["dyn_kept"] for r in auto]
    assert kept[0] == 256 and min(kept[1:]) < 256  # dynamic pruning skipped samples after epoch 1
    assert all(k % 2 == 0 for k in kept)  # no padding duplicate, so the same global batches as one process
    for a, s in zip(auto, single):
        _same_digests(a["dyn_rank_digests"])  # both ranks planned the same kept set, order and weights
        assert a["dyn_kept"] == s["dyn_kept"]
        assert a["train_loss"] == pytest.approx(s["train_loss"], abs=1e-4)
    thin, ref = _event(runs["auto"], "prune_structured"), _event(runs["single"], "prune_structured")
    _same_digests(thin["rank_digests"])
    assert thin["rank_digests"][0] == thin["kept_digest"] == ref["kept_digest"]  # same neurons as one process
    assert thin["widths"] == ref["widths"] and thin["params_after"] < thin["params_before"]
    replan = _event(runs["auto"], "replan")
    assert replan["replanned"] and "structured thinning" in replan["reason"]
    assert replan["after"]["predicted_peak_bytes"] < replan["before"]["predicted_peak_bytes"]


def test_resume_across_world_sizes_after_thinning_equals_uninterrupted(runs):
    import torch

    ref = _weights(runs["single"])
    ref_loss = _epochs(runs["single"])[-1]["train_loss"]
    for name, world in (("resumed2", 2), ("resumed1", 1)):
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert summary["epochs"] == 4 and summary["world_size"] == world
        assert (
            summary["pruning"]["widths"]
            == json.loads((runs["single"] / "summary.json").read_text())["pruning"]["widths"]
        )
        got = _weights(runs[name])
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].shape == ref[k].shape, k
            torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4, msg=f"{name}: {k}")
        assert _epochs(runs[name])[-1]["train_loss"] == pytest.approx(ref_loss, abs=1e-4)


def test_fsdp2_lotus_with_masks(runs):
    single, fsdp = _epochs(runs["single"]), _epochs(runs["fsdp"])
    assert len(fsdp) == 4
    for a, s in zip(fsdp, single):
        _same_digests(a["dyn_rank_digests"])
        assert a["train_loss"] == pytest.approx(s["train_loss"], abs=1e-4)
    thin, ref = _event(runs["fsdp"], "prune_structured"), _event(runs["single"], "prune_structured")
    _same_digests(thin["rank_digests"])
    assert thin["kept_digest"] == ref["kept_digest"] and thin["widths"] == ref["widths"]
    prunes = [r for r in _records(runs["fsdp"]) if r.get("event") == "prune"]
    ref_prunes = [r for r in _records(runs["single"]) if r.get("event") == "prune"]
    assert len(prunes) == len(ref_prunes) >= 3  # the ramp re-scored (and re-sharded) several times
    for p, q in zip(prunes, ref_prunes):
        _same_digests(p["rank_digests"])
        assert p["target"] == q["target"] and p["sparsity"] == q["sparsity"]
    assert prunes[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    summary = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert summary["pruning"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert fsdp[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The gathered weights are written as one process writes them: plain keys, thinned, masks folded in.
    w = _weights(runs["fsdp"])
    assert w.keys() == _weights(runs["single"]).keys()
    fc1 = w["blocks.0.mlp.fc1.weight"]
    assert fc1.shape[0] == thin["widths"]["blocks.0"]["mlp"]
    assert float((fc1 == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_config_allows_lotus_features_under_data_parallel():
    from lotus.config import config_from_dict
    from lotus.errors import ConfigError

    for mode in ("ddp", "fsdp"):
        cfg = config_from_dict(
            {
                "parallel": {"mode": mode},
                "tickets": {"dynamic": {"enabled": True}},
                "pruning": {"method": "wanda", "sparsity": 0.5, "structured": {"mlp": 0.5}},
            }
        )
        assert cfg.tickets.dynamic.enabled and cfg.pruning.enabled
    with pytest.raises(ConfigError, match="pruning.sparse_kernels: not supported") as e:
        config_from_dict({"parallel": {"mode": "ddp"}, "pruning": {"method": "2:4", "sparse_kernels": True}})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("importance", ["taylor", "activation", "wanda"])
def test_reduce_sum_of_split_calibration_equals_all_batches(importance):
    """The libraries' ``reduce_sum`` hook: two 'ranks' scoring half of the batches each and summing their
    statistics get what one process scoring every batch gets (the all-reduce is emulated in one process)."""
    import timm
    import torch

    import pruning
    from pruning.mask_scores import collect_input_norms
    from pruning.masks import select_modules
    from pruning.structured_units import find_blocks

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        num_classes=5,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(4)]
    if importance == "wanda":
        modules = select_modules(model)

        def score(batches, reduce=None):
            return collect_input_norms(model, modules, batches, reduce_sum=reduce)
    else:
        units = [b.mlp for b in find_blocks(model).values()]

        def score(batches, reduce=None):
            return pruning.structured_importance.unit_scores(model, units, importance, batches, None, None, reduce)

    recorded: list = []
    score(data[1::2], lambda t: recorded.append(t.clone()) or t)  # "rank 1": its statistics
    split = score(data[0::2], lambda t: t + recorded.pop(0))  # "rank 0": plus rank 1's, in the same order
    full = score(data)
    assert not recorded and split.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-7)
