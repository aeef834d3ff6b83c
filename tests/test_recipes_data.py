"""timm data pipeline (data.transform), data.cache, timm lr schedulers (optim.sched), checkpoint history
(output.keep_checkpoints): validation, transforms, mean/std, cache equality, lr sequences vs timm, resume."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config

from lotus.callbacks import Callback
from lotus.config import ModelConfig, config_from_dict
from lotus.data import batches, build_datasets
from lotus.data_transforms import check_auto_augment, resolve_mean_std
from lotus.errors import ConfigError
from lotus.optim import LrSchedule
from lotus.training import Trainer
from lotus.training.checkpoint_history import CheckpointHistory

TIMM = {
    "enabled": True,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "scale": [0.5, 1.0],
    "hflip": 0.0,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


def _d(tiny, **sections):
    d = {**tiny, **sections}
    d["data"] = {"limit_train": 192, **tiny["data"], **sections.get("data", {})}
    return d


@pytest.mark.parametrize(
    "section, message",
    [
        ({"data": {"transform": {"auto_augment": "rand-zz"}}}, "data.transform.auto_augment: bad section 'zz'"),
        ({"data": {"transform": {"auto_augment": "augmix-q"}}}, "data.transform.auto_augment: bad section 'q'"),
        (
            {"data": {"transform": {"auto_augment": "rand-m9-tfoo"}}},
            "data.transform.auto_augment: unknown transform set",
        ),
        ({"data": {"transform": {"auto_augment": "trivial"}}}, "data.transform.auto_augment: unknown policy 'trivial'"),
        ({"data": {"transform": {"re_prob": 1.5}}}, "data.transform.re_prob"),
        ({"data": {"transform": {"re_mode": "zero"}}}, "data.transform.re_mode: expected 'const' | 'rand' | 'pixel'"),
        ({"data": {"transform": {"re_count": 0}}}, "data.transform.re_count"),
        ({"data": {"transform": {"scale": [0.5]}}}, "data.transform.scale: expected [min, max]"),
        ({"data": {"transform": {"ratio": [2.0, 1.0]}}}, "data.transform.ratio: expected [min, max]"),
        ({"data": {"transform": {"hflip": 2}}}, "data.transform.hflip"),
        ({"data": {"transform": {"vflip": -1}}}, "data.transform.vflip"),
        ({"data": {"transform": {"color_jitter": -0.1}}}, "data.transform.color_jitter"),
        ({"data": {"transform": {"interpolation": "cubic"}}}, "data.transform.interpolation"),
        ({"data": {"transform": {"crop_pct": 0.0}}}, "data.transform.crop_pct"),
        ({"data": {"transform": {"mean": [0.5]}}}, "data.transform.std: set mean and std together"),
        ({"data": {"transform": {"mean": [0.5], "std": [0.0]}}}, "data.transform.std: expected 1 or 3 values > 0"),
        ({"data": {"transform": {"crop": 1}}}, "data.transform.crop: unknown key"),
        (
            {"data": {"transform": {"enabled": True}, "augment": {"rotate": 5}}},
            "data.augment.rotate: the tensor augmenter",
        ),
        ({"data": {"cache": "memory"}}, "data.cache: memory is for imagefolder"),
        ({"data": {"cache": "disk"}}, "data.cache: expected 'none' | 'memory'"),
        ({"optim": {"sched": "exp"}}, "optim.sched: expected 'cosine' | 'step'"),
        ({"optim": {"decay_milestones": [5, 2]}}, "optim.decay_milestones: expected increasing"),
        ({"optim": {"decay_rate": 0}}, "optim.decay_rate"),
        ({"optim": {"patience_epochs": -1}}, "optim.patience_epochs"),
        ({"optim": {"decay_epochs": 0}}, "optim.decay_epochs"),
        ({"optim": {"cooldown_epochs": 1.9}}, "optim.cooldown_epochs: 1.9 leaves no decay"),
        ({"output": {"keep_checkpoints": -1}}, "output.keep_checkpoints"),
    ],
)
def test_new_keys_are_validated(tiny_cfg_dict, section, message):
    d = tiny_cfg_dict
    for k, v in section.items():
        d[k] = {**d.get(k, {}), **v}
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "rand-m9-mstd0.5-inc1",
        "rand-m9-n3-mstd0.5-tweights",
        "augmix-m5-w4-d2",
        "original",
        "v0-mstd0.5",
        "trivialaugment",
    ],
)
def test_timm_auto_augment_strings_are_accepted(text):
    from timm.data import create_transform

    s = check_auto_augment(text, "k")
    tf = create_transform(16, is_training=True, auto_augment=s)
    assert any("Aug" in type(t).__name__ for t in tf.transforms)


def test_transforms_are_applied_seeded_and_worker_independent(tiny_cfg_dict):
    cfg = config_from_dict(_d(tiny_cfg_dict, data={"transform": TIMM}))
    b = build_datasets(cfg.data, 16, model_cfg=cfg.model, seed=3)
    x, y, i = b.train_aug[5]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int) and i == 5
    v = b.val[0][0]
    assert v.shape == (1, 16, 16) and v.dtype == torch.float32
    # timm's normalisation with the data's statistics: the clean train view's mean/std, shared by val
    norm = b.val.transform.transforms[-1]
    assert torch.allclose(norm.mean, b.train.mean.flatten()) and torch.allclose(norm.std, b.train.std.flatten())
    # seeded from (seed, epoch, index): the same whatever ran before, new draws each epoch
    random.seed(1), torch.manual_seed(1), np.random.seed(1)
    a = b.train_aug[5][0]
    random.random(), torch.rand(3), np.random.rand()
    assert torch.equal(a, b.train_aug[5][0])
    b.train_aug.set_epoch(1)
    assert not torch.equal(a, b.train_aug[5][0])
    idx = np.arange(40)
    one = list(batches(b.train_aug, idx, 16, num_workers=0))
    two = list(batches(b.train_aug, idx, 16, num_workers=2))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(one, two))


def test_mean_std_from_pretrained_cfg_when_fine_tuning(tiny_cfg_dict):
    ref = resolve_data_config(model=timm.create_model("deit_tiny_patch16_224", pretrained=False))
    stats = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    deit = ModelConfig(name="deit_tiny_patch16_224", pretrained=True)
    assert resolve_mean_std(None, deit, 3, stats) == (list(ref["mean"]), list(ref["std"]))
    deit_ck = ModelConfig(name="deit_tiny_patch16_224", checkpoint="weights.safetensors")
    assert resolve_mean_std(None, deit_ck, 3, stats) == (list(ref["mean"]), list(ref["std"]))
    assert resolve_mean_std(None, ModelConfig(name="deit_tiny_patch16_224"), 3, stats) == stats  # from scratch
    assert resolve_mean_std(None, ModelConfig(name="lotus_vit_micro", checkpoint="w.safetensors"), 3, stats) == stats
    # in-memory digits fine-tuning pretrained DeiT: the tensor path and timm's transform both use ImageNet's
    d = _d(
        tiny_cfg_dict,
        model={"name": "deit_tiny_patch16_224", "pretrained": True, "img_size": 16, "patch_size": 4, "in_chans": 3},
        data={"transform": TIMM},
    )
    cfg = config_from_dict(d)
    b = build_datasets(cfg.data, 16, 3, model_cfg=cfg.model)
    assert torch.allclose(b.train.mean.flatten(), torch.tensor(ref["mean"]))
    assert torch.allclose(b.val.transform.transforms[-1].mean, torch.tensor(ref["mean"]))
    assert b.train_aug[0][0].shape == (3, 16, 16)


def _folder(root, n=12, size=20):
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            for k in range(n):
                w, h = size + int(g.integers(0, 6)), size + int(g.integers(0, 6))  # mixed sizes
                Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{k}.png")
    return root


def test_cache_memory_gives_the_same_images(tmp_path):
    root = _folder(tmp_path / "f")
    base = {"name": "imagefolder", "root": str(root), "num_workers": 0}
    for extra in ({}, {"transform": TIMM}):
        plain = build_datasets(config_from_dict({"data": {**base, **extra}}).data, 16)
        cached = build_datasets(config_from_dict({"data": {**base, **extra, "cache": "memory"}}).data, 16)
        assert hasattr(cached.train, "get_batch") == (not extra)  # the tensor path slices whole batches
        for a, b in ((plain.train, cached.train), (plain.val, cached.val)) + (
            ((plain.train_aug, cached.train_aug),) if extra else ()
        ):
            idx = np.arange(len(a))
            for p, q in zip(batches(a, idx, 8), batches(b, idx, 8)):
                assert p[0].dtype == q[0].dtype == torch.float32 and torch.equal(p[0], q[0])
                assert torch.equal(p[1], q[1]) and torch.equal(p[2], q[2])


class _Seen(Callback):
    def __init__(self):
        self.seen = set()

    def transform_batch(self, trainer, x, y, idx):
        assert x.shape[1:] == (1, 16, 16)
        self.seen.update(idx.tolist())
        return x, y, idx


def test_tickets_dynamic_pruning_and_patches_with_randaugment(tmp_path, tiny_cfg_dict):
    from data_tickets import TicketFile

    keep = np.arange(0, 192, 3)
    TicketFile(indices=keep).save(tmp_path / "t.npz")
    for tickets, check in (
        ({"file": str(tmp_path / "t.npz")}, lambda seen, s: seen == set(keep.tolist())),
        (
            {"dynamic": {"enabled": True, "ratio": 0.5, "anneal": 0.0}},
            lambda seen, s: s["dynamic_pruning"]["pruned_total"] > 0,
        ),
        ({"patches": {"enabled": True, "scorer": "random", "keep_rate": 0.5}}, lambda seen, s: len(seen) == 192),
    ):
        d = _d(tiny_cfg_dict, data={"transform": TIMM}, tickets=tickets)
        d["train"]["epochs"] = 2
        cb = _Seen()
        s = Trainer(config_from_dict(d), write=False, quiet=True, callbacks=[cb]).fit()
        assert check(cb.seen, s) and math.isfinite(s["final_val_loss"]), tickets


# ------------------------------------------------------------------ schedulers
def _legacy_cosine(t, base, lo, warm, total):  # lotus.optim.CosineSchedule before optim.sched
    if warm > 0 and t < warm:
        return base * max(t, 1e-3 * warm) / warm
    progress = min(max((t - warm) / max(total - warm, 1e-12), 0.0), 1.0)
    return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def _groups():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    return torch.optim.AdamW([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=1e-3)


def _sched(optim, train):
    cfg = config_from_dict({"optim": {"lr": 1e-3, **optim}, "train": {"epochs": 12, "min_lr": 1e-5, **train}})
    return cfg, LrSchedule(_groups(), cfg.optim, cfg.train)


def test_default_cosine_is_the_same_lr_sequence_as_before_and_timms():
    from timm.scheduler import CosineLRScheduler

    _, s = _sched({}, {"warmup_epochs": 1.5})
    ts = [e + b / 7 for e in range(12) for b in range(7)]
    for t in ts:
        s.set_position(t)
        want = _legacy_cosine(t, 1e-3, 1e-5, 1.5, 12)
        assert [g["lr"] for g in s.optimizer.param_groups] == [want * 0.5, want]  # bit-identical, lr_scale applied
    _, s = _sched({}, {"warmup_epochs": 0.0})
    ref = CosineLRScheduler(_groups(), t_initial=12, lr_min=1e-5)
    for t in ts:
        assert s.lr_at(t) == pytest.approx(ref._get_lr(t)[1], rel=1e-12)


@pytest.mark.parametrize(
    "optim",
    [
        {"sched": "step", "decay_epochs": 4, "decay_rate": 0.5},
        {"sched": "multistep", "decay_milestones": [3, 7], "decay_rate": 0.2},
        {"sched": "poly", "decay_rate": 2.0, "cooldown_epochs": 2},
        {"sched": "tanh", "cooldown_epochs": 2},
        {"sched": "cosine", "cooldown_epochs": 2},
    ],
)
def test_timm_schedulers_give_timms_lr_per_group(optim):
    from timm.scheduler import create_scheduler_v2

    cfg, s = _sched(optim, {"warmup_epochs": 0.0})
    ref_opt = _groups()
    ref, _ = create_scheduler_v2(
        ref_opt,
        sched=optim["sched"],
        num_epochs=12 - optim.get("cooldown_epochs", 0),
        decay_epochs=cfg.optim.decay_epochs,
        decay_milestones=cfg.optim.decay_milestones,
        decay_rate=cfg.optim.decay_rate,
        min_lr=1e-5,
        warmup_epochs=0,
    )
    for t in [e + b / 3 for e in range(12) for b in range(3)]:
        s.set_position(t)
        ref.step(t)  # timm's own update_groups (lr_scale)
        got, want = [g["lr"] for g in s.optimizer.param_groups], [g["lr"] for g in ref_opt.param_groups]
        assert got == pytest.approx(want, rel=1e-12), t
    if optim.get("cooldown_epochs"):
        assert s.lr_at(10.5) == s.lr_at(11.9) == pytest.approx(1e-5)


def test_plateau_decays_on_val_acc_after_patience_and_keeps_its_counters():
    _, s = _sched({"sched": "plateau", "patience_epochs": 1, "decay_rate": 0.5}, {"warmup_epochs": 1.0})
    s.set_position(0.5)
    s.observe({"val_acc": 0.9})  # in the warm-up: ignored
    lrs = []
    for e, acc in zip(range(1, 7), (0.5, 0.6, 0.6, 0.6, 0.7, 0.7)):
        s.set_position(float(e))
        lrs.append(s.lr_at(e))
        s.observe({"val_acc": acc})
    assert lrs == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4]
    _, s2 = _sched({"sched": "plateau", "patience_epochs": 1, "decay_rate": 0.5}, {"warmup_epochs": 1.0})
    s2.load_state_dict(s.state_dict())
    for m in (s, s2):
        m.observe({"val_acc": 0.7})
    assert s.lr_at(7) == s2.lr_at(7) == 2.5e-4


class _StopAt(Callback):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "optim",
    [
        {"sched": "step", "decay_epochs": 1, "decay_rate": 0.5},
        {"sched": "plateau", "patience_epochs": 0, "decay_rate": 0.5},
    ],
)
def test_resume_is_bit_identical_with_timm_schedulers_transforms_and_history(tmp_path, tiny_cfg_dict, optim):
    d = _d(
        tiny_cfg_dict,
        data={"transform": TIMM},
        optim={**tiny_cfg_dict["optim"], **optim},
        output={"keep_checkpoints": 2},
    )
    d["train"].update(epochs=4, warmup_epochs=0.5)
    full = Trainer(config_from_dict(d), run_dir=str(tmp_path / "full"), quiet=True)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config_from_dict(d), run_dir=str(tmp_path / "cut"), quiet=True, callbacks=[_StopAt()]).fit()
    (tmp_path / "cut" / "checkpoint-3.safetensors").write_bytes(b"left by a killed epoch")
    resumed = Trainer(config_from_dict(d), run_dir=str(tmp_path / "cut"), quiet=True, resume=True)
    resumed.fit()
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    lr = [json.loads(x)["lr"] for x in open(tmp_path / "full" / "metrics.jsonl") if '"type": "epoch"' in x]
    assert len(set(lr)) > 1  # the schedule moved
    for run in ("full", "cut"):
        kept = json.loads((tmp_path / run / "checkpoints.json").read_text())["checkpoints"]
        files = sorted(p for p in os.listdir(tmp_path / run) if p.startswith("checkpoint-"))
        assert len(kept) == 2 and sorted(e["file"] for e in kept) == files
    assert json.loads((tmp_path / "full" / "checkpoints.json").read_text()) == json.loads(
        (tmp_path / "cut" / "checkpoints.json").read_text()
    )


def test_checkpoint_history_keeps_the_best_and_prunes(tmp_path):
    h = CheckpointHistory(str(tmp_path), keep=2)
    write = lambda path: open(path, "w").write("w")  # noqa: E731
    for epoch, acc in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.55), (5, 0.9), (6, None)):
        h.update(epoch, epoch * 10, acc, write)
        h.commit()
    assert [e["epoch"] for e in h.kept] == [5, 2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.safetensors", "checkpoint-5.safetensors", "checkpoints.json"]
    assert json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"][0]["val_acc"] == 0.9
    h.update(7, 70, 0.95, write)  # killed before state.pt: the dropped file is still there until commit
    assert os.path.exists(tmp_path / "checkpoint-2.safetensors")
    h.restore(
        [
            {"epoch": 5, "step": 50, "val_acc": 0.9, "file": "checkpoint-5.safetensors"},
            {"epoch": 2, "step": 20, "val_acc": 0.7, "file": "checkpoint-2.safetensors"},
        ]
    )
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.safetensors", "checkpoint-5.safetensors", "checkpoints.json"]
