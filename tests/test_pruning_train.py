"""The ``pruning:`` config section in the training loop: gradual masks, structured thinning, resume."""

from __future__ import annotations

import json

import pytest
import torch

from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.training import Trainer


def _cfg(tiny_cfg_dict, pruning_section, **train):
    d = tiny_cfg_dict
    d["data"].update(batch_size=32, limit_train=128, eval_batch_size=512)
    d["train"].update({"epochs": 3, "warmup_epochs": 0.0, **train})
    d["pruning"] = pruning_section
    return d


def _events(run_dir, name):
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r for r in recs if r.get("event") == name]


GRADUAL = {
    "method": "magnitude",
    "sparsity": 0.75,
    "schedule": "gradual",
    "start_epoch": 0.0,
    "end_epoch": 2.0,
    "frequency": 2,
    "structured": {"heads": 0.5, "mlp": 0.5, "at_epoch": 0.0},
}


def test_gradual_pruning_with_thinning_reaches_target_and_resume_matches(tmp_path, tiny_cfg_dict):
    import copy

    d = _cfg(copy.deepcopy(tiny_cfg_dict), copy.deepcopy(GRADUAL))
    full_dir = tmp_path / "full"
    summary = Trainer(config_from_dict(d), run_dir=str(full_dir), quiet=True).fit()
    p = summary["pruning"]
    assert p["structured"] and p["target_sparsity"] == pytest.approx(0.75)
    assert p["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert all(w == {"heads": 1, "mlp": 64} for w in p["widths"].values())  # micro: 2 heads, mlp 128
    thin = _events(full_dir, "prune_structured")
    assert len(thin) == 1 and thin[0]["params_after"] < thin[0]["params_before"]
    prunes = _events(full_dir, "prune")
    targets = [e["target"] for e in prunes]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.75) and len(targets) >= 3
    # the same run interrupted after epoch 1 and resumed ends in the same state
    part_dir = tmp_path / "part"
    d1 = copy.deepcopy(d)
    d1["train"]["max_steps"] = 4  # 128 samples / 32 = 4 steps per epoch
    first = Trainer(config_from_dict(d1), run_dir=str(part_dir), quiet=True).fit()
    assert first["steps"] == 4 and 0 < first["pruning"]["target_sparsity"] < 0.75
    resumed = Trainer(config_from_dict(d), run_dir=str(part_dir), resume=True, quiet=True).fit()
    assert resumed["steps"] == summary["steps"]
    assert resumed["pruning"]["sparsity"] == pytest.approx(p["sparsity"])
    assert len(_events(part_dir, "prune_structured")) == 1  # not thinned twice
    from safetensors.torch import load_file

    a, b = load_file(full_dir / "last.safetensors"), load_file(part_dir / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert resumed["final_val_acc"] == pytest.approx(summary["final_val_acc"])
    _check_export_reloads(d, full_dir / "last.safetensors")


def _check_export_reloads(d, path):
    """Exported weights are plain, thinned and sparse, and load into a fresh model through lotus."""
    from lotus.models import create_model
    from lotus.weights import load_weights
    from lotus.weights_meta import read_metadata

    assert read_metadata(path).get("widths"), (
        "save_weights wrote no block widths: pruning.structured.get_widths must accept masked (parametrized) layers"
    )
    fresh = create_model(config_from_dict(d).model, 10, 1, 16)
    load_weights(fresh, path)
    fc1 = fresh.blocks[0].mlp.fc1.weight
    assert fc1.shape[0] == 64 and float((fc1 == 0).float().mean()) > 0.5


def test_one_shot_two_four_on_cpu_logs_masked_dense(tmp_path, tiny_cfg_dict):
    d = _cfg(tiny_cfg_dict, {"method": "2:4", "at_epoch": 1.0, "sparse_kernels": True}, epochs=2, max_steps=6)
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / "r"), quiet=True).fit()
    assert summary["pruning"]["sparsity"] == pytest.approx(0.5)
    assert _events(tmp_path / "r", "prune")[0]["step"] == 4  # at the start of epoch 2
    notes = [e.get("note") for e in _events(tmp_path / "r", "sparse_kernels")]
    assert any(n and "no 2:4 kernels on CPU" in n for n in notes)
    from safetensors.torch import load_file

    from pruning.mask_scores import is_nm_sparse

    w = load_file(tmp_path / "r" / "last.safetensors")["blocks.0.attn.qkv.weight"]
    assert is_nm_sparse(w, 2, 4)


@pytest.mark.parametrize(
    "section,message",
    [
        ({"method": 124}, 'write method: "2:4"'),
        ({"method": "nm", "schedule": "gradual"}, "gradual needs method magnitude, wanda or taylor"),
        ({"method": "magnitude", "sparsity": 1.0}, "pruning.sparsity"),
        ({"method": "magnitude", "scope": "row"}, "pruning.scope"),
        ({"method": "magnitude", "sparse_kernels": True}, "sparse_kernels"),
        (
            {"method": "magnitude", "at_epoch": 0.0, "structured": {"heads": 0.5, "at_epoch": 1.0}},
            "structured.at_epoch",
        ),
        ({"structured": {"heads": 1.0}}, "pruning.structured.heads"),
        ({"method": "wanda", "schedule": "gradual", "start_epoch": 2, "end_epoch": 1}, "end_epoch"),
    ],
)
def test_config_errors(tiny_cfg_dict, section, message):
    d = _cfg(tiny_cfg_dict, section)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_dict(d)


def test_schedule_past_training_is_an_error(tmp_path, tiny_cfg_dict):
    d = _cfg(tiny_cfg_dict, {"method": "magnitude", "at_epoch": 5.0})
    with pytest.raises(ConfigError, match=r"pruning.at_epoch: expected a value < train.epochs \(3\)"):
        Trainer(config_from_dict(d), run_dir=str(tmp_path / "x"), quiet=True)


def test_disabled_by_default(tiny_cfg):
    from lotus.features.registry import build_callbacks
    from lotus.features.schedule.phases import Schedule

    assert not tiny_cfg.pruning.enabled and build_callbacks(tiny_cfg, Schedule(tiny_cfg)) == []
