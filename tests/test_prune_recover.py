"""Prune, then recover: `lotus prune --finetune-epochs N [--distill]` and the `distill:` feature."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from conftest import TINY
from safetensors.torch import load_file
from torch import nn

from lotus.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro ViT trained 4 epochs on digits: its config and last weights."""
    tmp = tmp_path_factory.mktemp("recover")
    d = copy.deepcopy(TINY)
    d["train"]["epochs"] = 4
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "dense"), "--quiet"]) == 0
    return tmp, str(cfg), str(tmp / "dense" / "last.safetensors")


FAST = ["--latency-iters", "0", "--calib-batches", "1"]


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("distill", [False, True])
def test_structured_prune_then_finetune_recovers_accuracy(trained, distill):
    from lotus.config import ModelConfig
    from lotus.models import create_model
    from lotus.weights import load_weights
    from lotus.weights_meta import model_config_from_checkpoint, read_model_metadata
    from pruning import get_widths

    tmp, cfg, ckpt = trained
    out = tmp / f"thin-distill{int(distill)}"
    argv = [
        "prune",
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
        "--finetune-epochs",
        "2",
        "--out",
        str(out),
        *FAST,
    ] + (["--distill"] if distill else [])
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    acc = rep["accuracy"]
    assert acc["before_pruning"] == rep["before"]["val_acc"] and acc["after_pruning"] == rep["after"]["val_acc"]
    assert acc["after_pruning"] < acc["before_pruning"] - 0.1  # halving heads and MLP hurts this model ...
    assert acc["after_recovery"] > acc["after_pruning"] + 0.1  # ... and two epochs win most of it back
    r = rep["recovery"]
    assert r["epochs"] == 2 and r["distilled"] is distill and r["wall_s"] > 0 and r["val_acc"] == acc["after_recovery"]
    assert r["lr"] == pytest.approx(0.1 * TINY["optim"]["lr"])
    ft = out / "finetune"
    assert (ft / "summary.json").is_file() and (ft / "last.safetensors").is_file()
    run_cfg = yaml.safe_load((ft / "config.yaml").read_text())
    assert run_cfg["model"]["checkpoint"] == str((out / "pruned.safetensors").resolve())
    assert run_cfg["train"]["epochs"] == 2
    assert ("distill" in run_cfg) is distill and (out / "teacher.safetensors").is_file() is distill
    if distill:
        assert run_cfg["distill"]["teacher"] == str((out / "teacher.safetensors").resolve())
        assert json.loads((ft / "summary.json").read_text())["distill"]["alpha"] == 0.5
    md = (out / "report.md").read_text()
    assert "## recovery" in md and "after recovery" in md
    # the fine-tuned file rebuilds thinned from its own metadata, and holds other weights than the pruned one
    path = str(out / "model.safetensors")
    mcfg = model_config_from_checkpoint(ModelConfig(), path, {})
    assert read_model_metadata(path)["widths"]
    model = load_weights(create_model(mcfg, 10, 1, 16), path)
    assert all(w == {"heads": 1, "mlp": 64} for w in get_widths(model).values())
    pruned = load_file(out / "pruned.safetensors")
    tuned = load_file(path)
    assert pruned.keys() == tuned.keys() and not torch.equal(
        pruned["blocks.0.mlp.fc1.weight"], tuned["blocks.0.mlp.fc1.weight"]
    )
    assert torch.isfinite(model(torch.randn(2, 1, 16, 16))).all()


@pytest.mark.parametrize(
    "method", [["magnitude", "--sparsity", "0.6"], ["wanda", "--sparsity", "0.5"], ["2:4", "--score", "wanda"]]
)
def test_masks_stay_exactly_the_pruned_ones_while_finetuning(trained, method):
    tmp, cfg, ckpt = trained
    out = tmp / f"mask-{method[0].replace(':', '')}"
    assert (
        main(
            [
                "prune",
                "--config",
                cfg,
                "--checkpoint",
                ckpt,
                "--method",
                *method,
                "--finetune-epochs",
                "1",
                "--set",
                "data.limit_train=256",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["recovery"]["masks_checked"] and rep["recovery"]["sparsity"] == pytest.approx(rep["total"]["sparsity"])
    pruned, tuned = load_file(out / "pruned.safetensors"), load_file(out / "model.safetensors")
    masked = [k for k in rep["layers"] if rep["layers"][k].get("masked")]
    assert masked
    for layer in masked:
        k = f"{layer}.weight"
        assert torch.equal(pruned[k] == 0, tuned[k] == 0), k  # the same zeros: the same mask
        assert not torch.equal(pruned[k], tuned[k]), k  # and the kept weights were trained
    run_cfg = yaml.safe_load((out / "finetune" / "config.yaml").read_text())
    assert run_cfg["pruning"]["method"] == method[0] and run_cfg["pruning"]["at_epoch"] == 0


def test_same_masks_stops_a_fit_whose_masks_differ():
    from types import SimpleNamespace

    from lotus.commands.prune_recover import SameMasks
    from lotus.errors import LotusError
    from pruning.masks import set_mask

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask(model[0], mask)
    trainer = SimpleNamespace(unwrapped_model=model)
    SameMasks({"0": mask.clone()}).on_fit_start(trainer)  # the same mask: no error
    flipped = mask.clone()
    flipped[0, 0] = ~flipped[0, 0]
    for expected in ({"0": flipped}, {"0": mask, "1": torch.ones(2, 4, dtype=torch.bool)}):
        with pytest.raises(LotusError, match="another mask in 1 layer"):
            SameMasks(expected).on_fit_start(trainer)


def test_recovery_flag_errors_are_one_line(trained, capsys):
    tmp, cfg, ckpt = trained
    out = str(tmp / "err")
    base = ["prune", "--config", cfg, "--checkpoint", ckpt, "--method", "structured", "--mlp", "0.5", "--out", out]
    cases = [
        (["--distill"], "--distill: only used with --finetune-epochs N"),
        (["--finetune-lr", "1e-3"], "--finetune-lr: only used with --finetune-epochs N"),
        (["--finetune-epochs", "-1"], "--finetune-epochs: expected an int >= 0"),
        (["--finetune-epochs", "1", "--finetune-lr", "0"], "--finetune-lr: expected a number > 0"),
        (["--finetune-epochs", "1", "--distill", "--distill-alpha", "1.5"], "--distill-alpha"),
    ]
    for extra, needle in cases:
        assert needle in _err(capsys, base + extra), extra
    no_data = [
        "prune",
        "--checkpoint",
        ckpt,
        "--method",
        "structured",
        "--mlp",
        "0.5",
        "--finetune-epochs",
        "1",
        "--out",
        out,
    ]
    assert "--finetune-epochs: fine-tuning needs training data" in _err(capsys, no_data)
    sweep = [
        "prune",
        "--config",
        cfg,
        "--checkpoint",
        ckpt,
        "--sweep",
        "magnitude",
        "--finetune-epochs",
        "1",
        "--out",
        out,
    ]
    assert "not with --sweep" in _err(capsys, sweep)


# ------------------------------------------------------------------------------------------- distill feature
class _Fixed(nn.Module):
    """A 'teacher' whose logits are the first C features of its input."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.c]


def _callback(alpha: float, smoothing: float = 0.0):
    from lotus.features.distill.callback import DistillCallback
    from lotus.features.distill.config import DistillConfig

    cb = DistillCallback(DistillConfig(enabled=True, teacher="t.safetensors", alpha=alpha), smoothing)
    cb.set_teacher(_Fixed(5))
    return cb


def test_distill_targets_mix_teacher_softmax_and_labels():
    g = torch.Generator().manual_seed(0)
    images, labels, index = torch.randn(6, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 3, 4, 0]), torch.arange(6)
    teacher = images.flatten(1)[:, :5].softmax(-1)
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    x, t, i = _callback(0.3).transform_batch(None, images, labels, index)
    assert x is images and i is index and t.shape == (6, 5)
    assert torch.allclose(t.sum(-1), torch.ones(6)) and ((t > 0) & (t < 1)).all()  # soft: no row is one-hot
    assert torch.allclose(t, 0.3 * teacher + 0.7 * onehot)
    assert torch.equal(_callback(0.0).soft_targets(images, labels), onehot)
    assert torch.allclose(_callback(1.0).soft_targets(images, labels), teacher)
    # soft labels (mixup ran first) are mixed as they are; hard ones take train.label_smoothing
    mixed = 0.5 * onehot + 0.5 * onehot.roll(1, 0)
    assert torch.allclose(_callback(0.25).soft_targets(images, mixed), 0.25 * teacher + 0.75 * mixed)
    smooth = _callback(0.0, smoothing=0.1).soft_targets(images, labels)
    assert torch.allclose(smooth, onehot * 0.9 + 0.1 / 5) and torch.allclose(smooth.sum(-1), torch.ones(6))


@pytest.mark.parametrize(
    "section, needle",
    [
        ({"alpha": 1.5}, "distill.alpha: expected float >= 0.0 and <= 1.0"),
        ({"alpha": -0.1}, "distill.alpha"),
        ({"enabled": True}, "distill.teacher: required when distill.enabled is true"),
        ({"enabled": True, "teacher": "teacher.pt"}, "distill.teacher: expected a .safetensors file"),
        ({"temperature": 2.0}, "distill.temperature: unknown key"),
    ],
)
def test_bad_distill_config_names_the_key(tiny_cfg_dict, section, needle):
    from lotus.config import config_from_dict
    from lotus.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from_dict({**tiny_cfg_dict, "distill": section})
    assert needle in str(e.value)


def test_teacher_of_other_classes_or_without_model_record_is_an_error(tmp_path, tiny_yaml, capsys):
    import timm

    import lotus.models  # noqa: F401 - registers lotus_vit_micro
    from lotus.config import ModelConfig
    from lotus.weights import save_weights

    five = timm.create_model("lotus_vit_micro", img_size=16, patch_size=4, num_classes=5, in_chans=1)
    path = tmp_path / "five.safetensors"
    save_weights(five, path, {}, model_cfg=ModelConfig(name="lotus_vit_micro", img_size=16, patch_size=4))
    bare = tmp_path / "bare.safetensors"
    save_weights(five, bare, {})
    for teacher, needle in ((path, "predicts 5 classes, the data has 10"), (bare, "records no model")):
        err = _err(
            capsys,
            [
                "train",
                "--config",
                str(tiny_yaml),
                "--out",
                str(tmp_path / "run"),
                "--force",
                "--quiet",
                "--set",
                "distill.enabled=true",
                "--set",
                f"distill.teacher={teacher}",
            ],
        )
        assert err.startswith("error: distill.teacher:") and needle in err, err
