"""Training-recipe options built from timm's parts: accumulation, clipping modes, BCE, layer decay, mixup /
cutmix (also with dynamic pruning), model EMA (also through structured thinning and resume)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from lotus.callbacks import Callback
from lotus.config import config_from_dict
from lotus.errors import ConfigError, LotusError
from lotus.training import Trainer
from lotus.training.loss import per_sample_loss


def _cfg(d, **sections):
    d = {**d, **sections}
    d["data"] = {**d["data"], "limit_train": 256}
    return d


@pytest.mark.parametrize(
    "section, message",
    [
        ({"train": {"accumulate_steps": 0}}, "train.accumulate_steps: expected int >= 1"),
        ({"train": {"clip_mode": "l1"}}, "train.clip_mode: expected 'norm' | 'value' | 'agc'"),
        ({"train": {"loss": "focal"}}, "train.loss: expected 'ce' | 'bce'"),
        ({"train": {"bce_target_thresh": 2.0}}, "train.bce_target_thresh"),
        ({"train": {"log_every_n_steps": -1}}, "train.log_every_n_steps"),
        ({"train": {"compile": "yes"}}, "train.compile: expected bool"),
        ({"optim": {"layer_decay": 1.5}}, "optim.layer_decay"),
        ({"mixup": {"mode": "pixel"}}, "mixup.mode"),
        ({"mixup": {"cutmix_minmax": [0.5]}}, "mixup.cutmix_minmax"),
        ({"mixup": {"enabled": True, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}}, "mixup.mixup_alpha"),
        ({"mixup": {"alpha": 1.0}}, "mixup.alpha: unknown key"),
        ({"ema": {"decay": 1.0}}, "ema.decay"),
        ({"ema": {"enabled": True}, "pruning": {"method": "magnitude"}}, "ema.enabled: not supported together with"),
    ],
)
def test_recipe_keys_are_validated(tiny_cfg_dict, section, message):
    d = tiny_cfg_dict
    for k, v in section.items():
        d[k] = {**d.get(k, {}), **v}
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert message in str(e.value)


def test_fp16_on_cpu_is_a_clear_error(tiny_cfg_dict):
    tiny_cfg_dict["train"].update(amp="fp16", device="cpu")
    with pytest.raises(LotusError, match="train.amp: fp16 needs a CUDA device"):
        Trainer(config_from_dict(tiny_cfg_dict), write=False, quiet=True).fit()


def test_per_sample_losses_match_timm():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    soft = torch.softmax(torch.randn(6, 5), -1)
    assert torch.allclose(per_sample_loss(logits, soft).mean(), SoftTargetCrossEntropy()(logits, soft))
    for smoothing in (0.0, 0.1):
        ours = per_sample_loss(logits, labels, "bce", smoothing).mean()
        assert torch.allclose(ours, BinaryCrossEntropy(smoothing=smoothing)(logits, labels), atol=1e-6)
    assert torch.allclose(
        per_sample_loss(logits, labels, "bce", 0.0, 0.5).mean(),
        BinaryCrossEntropy(smoothing=0.0, target_threshold=0.5)(logits, labels),
        atol=1e-6,
    )


def _fit(d, **kw):
    t = Trainer(config_from_dict(d), write=kw.pop("write", False), quiet=True, **kw)
    return t, t.fit()


def test_accumulation_equals_the_large_batch(tiny_cfg_dict):
    """2 x 16 accumulated = one batch of 32 (constant lr, no clipping), and steps count optimiser steps."""
    base = _cfg(tiny_cfg_dict)
    base["train"].update(epochs=1, warmup_epochs=0.0, min_lr=3e-2, grad_clip=None)
    base["optim"] = {"name": "sgd", "lr": 3e-2, "momentum": 0.9, "weight_decay": 0.0}  # Adam would amplify rounding
    big, s_big = _fit(base)
    acc = json.loads(json.dumps(base))
    acc["data"]["batch_size"] = 16
    acc["train"]["accumulate_steps"] = 2
    small, s_small = _fit(acc)
    assert s_small["steps"] == s_big["steps"] == 8
    a, b = big.model.state_dict(), small.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


@pytest.mark.parametrize("mode", ["value", "agc"])
def test_clip_modes_and_bce_train(tiny_cfg_dict, mode):
    d = _cfg(tiny_cfg_dict)
    d["train"].update(epochs=1, clip_mode=mode, grad_clip=0.5 if mode == "value" else 0.05, loss="bce")
    _, s = _fit(d)
    assert s["final_val_acc"] is not None and s["final_val_loss"] == s["final_val_loss"]


def test_layer_decay_groups_and_thinning_keeps_optimizer_state(tiny_cfg_dict):
    d = _cfg(
        tiny_cfg_dict,
        optim={**tiny_cfg_dict["optim"], "layer_decay": 0.65},
        pruning={"structured": {"mlp": 0.5, "at_epoch": 1}},
    )
    t, s = _fit(d)
    scales = sorted({round(g["lr_scale"], 6) for g in t.optimizer.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 0.65**2
    ev = next(e for e in s["events"] if e["event"] == "prune_structured")
    assert ev["optimizer_state_kept"] is True


class _Targets(Callback):
    def __init__(self):
        self.shapes = set()
        self.losses = []

    def transform_batch(self, trainer, images, labels, index):
        self.shapes.add(tuple(labels.shape[1:]))
        return images, labels, index

    def per_sample_loss(self, trainer, loss, index):
        self.losses.append(loss.detach())
        return loss


def test_mixup_cutmix_give_soft_targets_and_work_with_dynamic_pruning(tiny_cfg_dict):
    d = _cfg(
        tiny_cfg_dict,
        mixup={"enabled": True, "mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        tickets={"dynamic": {"enabled": True, "ratio": 0.5, "anneal": 0.0}},
    )
    d["data"]["limit_train"] = 250  # odd last batch after pruning / at the end of an epoch
    d["train"].update(epochs=3, label_smoothing=0.1)
    rec = _Targets()
    _, s = _fit(d, callbacks=[rec])
    assert rec.shapes == {(10,)}  # every training batch carries (B, 10) soft targets
    assert all(torch.isfinite(v).all() for v in rec.losses)
    assert s["dynamic_pruning"]["pruned_total"] > 0 and s["final_val_loss"] == s["final_val_loss"]


class _StopAt(Callback):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 3:
            raise KeyboardInterrupt


def test_ema_follows_thinning_is_evaluated_saved_and_resumes_bit_identically(tmp_path, tiny_cfg_dict):
    from lotus.weights_meta import read_metadata
    from pruning import get_widths

    d = _cfg(
        tiny_cfg_dict,
        ema={"enabled": True, "decay": 0.9},
        pruning={"structured": {"mlp": 0.5, "heads": 0.5, "at_epoch": 1}},
    )
    d["train"]["epochs"] = 4
    full, s = _fit(d, run_dir=str(tmp_path / "full"), write=True)
    ema = next(cb for cb in full.callbacks if type(cb).__name__ == "EmaCallback").ema.module
    assert get_widths(ema) == get_widths(full.unwrapped_model) != {}
    recs = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert all("ema_val_acc" in r for r in recs if r["type"] == "epoch")
    assert read_metadata(str(tmp_path / "full" / "ema.safetensors"))["ema"] is True
    with pytest.raises(KeyboardInterrupt):
        Trainer(config_from_dict(d), run_dir=str(tmp_path / "cut"), quiet=True, callbacks=[_StopAt()]).fit()
    resumed = Trainer(config_from_dict(d), run_dir=str(tmp_path / "cut"), quiet=True, resume=True)
    resumed.fit()
    ema2 = next(cb for cb in resumed.callbacks if type(cb).__name__ == "EmaCallback").ema.module
    for a, b in ((full.model, resumed.model), (ema, ema2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert os.path.isfile(tmp_path / "cut" / "ema.safetensors")


def test_log_every_n_steps_writes_step_records(tmp_path, tiny_cfg_dict):
    d = _cfg(tiny_cfg_dict)
    d["train"].update(epochs=1, log_every_n_steps=3)
    _fit(d, run_dir=str(tmp_path / "r"), write=True)
    steps = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl") if '"type": "step"' in x]
    assert [r["step"] for r in steps] == [3, 6] and all(r["loss"] > 0 and r["lr"] > 0 for r in steps)


def test_compile_without_a_cpu_compiler_says_so(tiny_cfg_dict, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    tiny_cfg_dict["train"].update(compile=True, device="cpu")
    with pytest.raises(LotusError, match="train.compile: torch.compile on CPU needs a C\\+\\+ compiler"):
        Trainer(config_from_dict(tiny_cfg_dict), write=False, quiet=True).fit()


@pytest.mark.parametrize("name", ["digits_recipe", "digits_finetune", "deit_tiny_cifar10", "finetune_deit_small"])
def test_shipped_recipe_configs_load(name):
    from pathlib import Path

    from lotus.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.ema.enabled


def test_digits_recipe_config_trains_a_few_steps(tmp_path):
    from pathlib import Path

    from lotus.config import load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "digits_recipe.yaml",
        ["train.epochs=1", "train.max_steps=4", "train.threads=1", "data.limit_train=256"],
    )
    s = Trainer(cfg, run_dir=str(tmp_path / "r"), quiet=True).fit()
    assert s["steps"] == 4 and (tmp_path / "r" / "ema.safetensors").is_file()


def test_tensorboard_gets_the_same_scalars(tmp_path, tiny_cfg_dict, monkeypatch):
    from lotus.training import run_log

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append("closed")

    monkeypatch.setattr(run_log, "tensorboard_writer", FakeWriter)
    d = _cfg(tiny_cfg_dict, output={"tensorboard": True})
    d["train"].update(epochs=1, log_every_n_steps=4)
    _fit(d, run_dir=str(tmp_path / "r"), write=True)
    tags = {w[0] for w in written if w != "closed"}
    assert {"epoch/train_loss", "epoch/val_acc", "step/loss", "step/lr"} <= tags and written[-1] == "closed"
    recs = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    epoch = next(r for r in recs if r["type"] == "epoch")
    assert ("epoch/val_acc", epoch["val_acc"], epoch["step"]) in written


def test_tensorboard_missing_is_a_clear_error(tmp_path, tiny_cfg_dict, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    d = _cfg(tiny_cfg_dict, output={"tensorboard": True})
    with pytest.raises(LotusError, match="output.tensorboard: needs the tensorboard package"):
        _fit(d, run_dir=str(tmp_path / "r"), write=True)


def test_thinning_under_soap_keeps_its_preconditioners(tiny_cfg_dict):
    d = _cfg(
        tiny_cfg_dict,
        optim={**tiny_cfg_dict["optim"], "name": "soap"},
        pruning={"structured": {"mlp": 0.5, "at_epoch": 1}},
    )
    d["train"]["epochs"] = 2
    t, s = _fit(d)
    ev = next(e for e in s["events"] if e["event"] == "prune_structured")
    assert ev["optimizer_state_kept"] is True and s["final_val_loss"] == s["final_val_loss"]
    fc1 = t.model.blocks[0].mlp.fc1.weight
    gg = t.optimizer.state[fc1]["GG"]
    assert tuple(gg[0].shape) == (fc1.shape[0],) * 2 and tuple(gg[1].shape) == (fc1.shape[1],) * 2


def test_wandb_logs_the_same_scalars_offline(tmp_path, tiny_cfg_dict, monkeypatch):
    """output.wandb: one W&B run per run folder (id from the folder, resume allowed), scalars at their step."""
    import sys
    import types

    calls: dict = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((dict(values), step))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    d = _cfg(tiny_cfg_dict, output={"wandb": "offline", "wandb_project": "p"})
    d["train"].update(epochs=1, log_every_n_steps=4)
    _fit(d, run_dir=str(tmp_path / "r"), write=True)
    (init,) = calls["init"]
    assert init["mode"] == "offline" and init["project"] == "p" and init["dir"] == str(tmp_path / "r")
    assert init["resume"] == "allow" and len(init["id"]) == 16 and init["config"]["output"]["wandb"] == "offline"
    recs = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    epoch = next(r for r in recs if r["type"] == "epoch")
    assert ({k: v for k, v in calls["log"][-1][0].items()}["epoch/val_acc"], calls["log"][-1][1]) == (
        epoch["val_acc"],
        epoch["step"],
    )
    assert any("step/loss" in v for v, _ in calls["log"]) and calls["finish"] == 1
    with pytest.raises(Exception, match="output.wandb: expected .off. | .offline. | .online., got .yes."):
        _fit(_cfg(tiny_cfg_dict, output={"wandb": "yes"}), run_dir=str(tmp_path / "bad"), write=True)


def test_wandb_missing_is_a_clear_error(tmp_path, tiny_cfg_dict, monkeypatch):
    import sys

    from lotus.errors import LotusError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(LotusError, match=r"output.wandb: needs the wandb package \(pip install wandb"):
        _fit(_cfg(tiny_cfg_dict, output={"wandb": "offline"}), run_dir=str(tmp_path / "r"), write=True)
