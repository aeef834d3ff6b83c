"""tickets.dynamic and tickets.patches in lotus training: config validation, tiny runs, files, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lotus.callbacks import Callback
from lotus.config import config_from_dict
from lotus.errors import ConfigError, LotusError
from lotus.training import Trainer

TRAIN_SIZE = 1437  # digits train split (val_fraction 0.2)


def _cfg(d, **tickets):
    d["tickets"] = tickets
    return config_from_dict(d)


class Recorder(Callback):
    """Records the sample indices trained on per epoch and the token count the first block sees."""

    order = 100

    def __init__(self):
        self.indices: dict[int, list[int]] = {}
        self.tokens: set[tuple[bool, int]] = set()
        self._hook = None

    def on_fit_start(self, trainer):
        from lotus.models import unwrap

        blk = unwrap(trainer.model).blocks[0]
        self._hook = blk.register_forward_pre_hook(lambda m, args: self.tokens.add((m.training, args[0].shape[1])))

    def transform_batch(self, trainer, images, labels, index):
        self.indices.setdefault(trainer.epoch, []).extend(index.tolist())
        return images, labels, index

    def on_fit_end(self, trainer, summary):
        self._hook.remove()


# --------------------------------------------------------------------------------------------- config
def test_sections_default_to_disabled(tiny_cfg_dict):
    cfg = config_from_dict(tiny_cfg_dict)
    assert not cfg.tickets.dynamic.enabled and not cfg.tickets.patches.enabled
    from lotus.features.registry import build_callbacks
    from lotus.features.schedule.phases import Schedule

    assert build_callbacks(cfg, Schedule(cfg)) == []


@pytest.mark.parametrize(
    "section,match",
    [
        ({"dynamic": {"ratio": 1.0}}, r"tickets.dynamic.ratio: expected float >= 0.0 and < 1.0, got 1.0"),
        ({"dynamic": {"anneal": -0.1}}, r"tickets.dynamic.anneal: expected float >= 0.0 and <= 1.0"),
        ({"dynamic": {"ratoi": 0.3}}, r"tickets.dynamic.ratoi: unknown key"),
        ({"patches": {"keep_rate": 0.0}}, r"tickets.patches.keep_rate: expected float > 0.0"),
        ({"patches": {"scorer": "entropy"}}, r"tickets.patches.scorer: expected 'cls_attention' \| 'random'"),
        ({"patches": {"source": "file"}}, r"tickets.patches.file: required with tickets.patches.source: file"),
        ({"patches": {"source": "file", "file": "x.txt"}}, r"tickets.patches.file: expected a ticket .npz"),
        ({"patches": {"file": "x.npz"}}, r"tickets.patches.file: only used with tickets.patches.source: file"),
        ({"patches": {"schedule": [[0, 1.0], [0, 0.5]]}}, r"tickets.patches.schedule\[1\]: epochs must increase"),
        ({"patches": {"schedule": [[0, 1.5]]}}, r"tickets.patches.schedule\[0\]: keep_rate must be in \(0, 1\]"),
        ({"patches": {"schedule": [[0, "half"]]}}, r"tickets.patches.schedule\[0\]\[1\]: expected float"),
        ({"patches": {"refresh_every": -1}}, r"tickets.patches.refresh_every: expected int >= 0"),
    ],
)
def test_bad_config_values_are_one_line_errors(tiny_cfg_dict, section, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tiny_cfg_dict, **section)


# --------------------------------------------------------------------------------------------- dynamic
def test_dynamic_pruning_run_saves_samples_and_exports_a_ticket(tmp_path, tiny_cfg_dict):
    from data_tickets import TicketFile

    tiny_cfg_dict["train"]["epochs"] = 4
    cfg = _cfg(tiny_cfg_dict, dynamic={"enabled": True, "ratio": 0.5, "anneal": 0.25, "export_ticket": True})
    rec = Recorder()
    summary = Trainer(cfg, run_dir=str(tmp_path / "run"), quiet=True, callbacks=[rec]).fit()
    counts = [len(rec.indices[e]) for e in range(4)]
    assert counts[0] == TRAIN_SIZE and counts[3] == TRAIN_SIZE  # no scores yet / annealing epoch
    assert counts[1] < TRAIN_SIZE and counts[2] < TRAIN_SIZE
    assert all(len(set(rec.indices[e])) == counts[e] for e in range(4))  # no sample twice in an epoch
    assert summary["samples_seen"] == sum(counts)
    assert summary["dynamic_pruning"]["pruned_total"] == 4 * TRAIN_SIZE - sum(counts)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [r["dyn_pruned"] for r in epochs] == [TRAIN_SIZE - c for c in counts]
    assert [r["dyn_annealing"] for r in epochs] == [False, False, False, True]
    events = [r["event"] for r in recs if r["type"] == "event"]
    assert "dynamic_pruning" in events and "dynamic_anneal" in events
    assert "dynamic_ticket" in [e["event"] for e in summary["events"]]
    ticket = TicketFile.load(tmp_path / "run" / "dynamic_ticket.npz")
    assert ticket.fingerprint["size"] == TRAIN_SIZE and 0 < ticket.count < TRAIN_SIZE
    # the exported ticket trains like any `lotus select` ticket
    d = dict(tiny_cfg_dict, tickets={"file": str(tmp_path / "run" / "dynamic_ticket.npz")})
    d["train"] = dict(d["train"], epochs=1)
    assert Trainer(config_from_dict(d), write=False, quiet=True).fit()["samples_seen"] == ticket.count


def test_dynamic_pruning_stays_inside_a_ticket_subset(tmp_path, tiny_cfg_dict):
    from data_tickets import TicketFile
    from lotus.data import build_datasets

    bundle = build_datasets(config_from_dict(tiny_cfg_dict).data, 16, 1)
    subset = np.arange(0, TRAIN_SIZE, 3)
    TicketFile.create(subset, dataset=bundle.train, labels=bundle.labels_train).save(tmp_path / "t.npz")
    tiny_cfg_dict["train"]["epochs"] = 2
    tiny_cfg_dict["tickets"] = {"file": str(tmp_path / "t.npz"), "dynamic": {"enabled": True, "anneal": 0.0}}
    rec = Recorder()
    Trainer(config_from_dict(tiny_cfg_dict), write=False, quiet=True, callbacks=[rec]).fit()
    assert sorted(rec.indices[0]) == subset.tolist()
    assert set(rec.indices[1]) < set(subset.tolist())


class _StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _resume_matches(tmp_path, cfg, stop=2):
    full = Trainer(cfg, run_dir=str(tmp_path / "full"), quiet=True)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, callbacks=[_StopAt(stop)]).fit()
    resumed = Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, resume=True)
    summary = resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["samples_seen"] == full.samples_seen
    return full, resumed


def test_dynamic_pruning_resume_matches_uninterrupted(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 3
    tiny_cfg_dict["data"]["limit_train"] = 400
    cfg = _cfg(tiny_cfg_dict, dynamic={"enabled": True, "ratio": 0.7, "anneal": 0.0})
    full, resumed = _resume_matches(tmp_path, cfg)
    assert full.samples_seen < 3 * 400


# --------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize(
    "patches",
    [
        {"keep_rate": 0.5},  # online CLS attention, re-scored every epoch
        {"keep_rate": 0.25, "refresh_every": 0, "rollout": True},  # scored on every (augmented) batch
        {"keep_rate": 0.5, "scorer": "random"},  # the baseline
    ],
)
def test_patch_tickets_train_on_kept_tokens_and_evaluate_on_all(tiny_cfg_dict, patches):
    tiny_cfg_dict["train"]["epochs"] = 1
    cfg = _cfg(tiny_cfg_dict, patches={"enabled": True, **patches})
    rec = Recorder()
    t = Trainer(cfg, write=False, quiet=True, callbacks=[rec])
    summary = t.fit()
    k = round(16 * patches["keep_rate"])
    train_tokens = {n for training, n in rec.tokens if training}
    eval_tokens = {n for training, n in rec.tokens if not training}
    assert train_tokens == {1 + k}
    assert 1 + 16 in eval_tokens  # validation sees every patch
    assert np.isfinite(summary["final_val_loss"])
    events = [e["event"] for e in summary["events"]]
    assert [e for e in events if e != "data_resized"][:2] == ["patch_tickets", "keep_rate"]
    assert ("patch_refresh" in events) == (patches.get("refresh_every", 1) > 0 and patches.get("scorer") != "random")


def test_patch_keep_rate_schedule_and_dynamic_together(tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 3
    cfg = _cfg(
        tiny_cfg_dict,
        dynamic={"enabled": True, "anneal": 0.0},
        patches={"enabled": True, "schedule": [[0, 1.0], [1, 0.25], [2, 0.5]]},
    )
    rec = Recorder()
    seen_tokens = {}

    class PerEpoch(Callback):
        order = 200

        def on_fit_start(self, trainer):
            from lotus.models import unwrap

            unwrap(trainer.model).blocks[0].register_forward_pre_hook(
                lambda m, a: seen_tokens.setdefault(trainer.epoch, set()).add(a[0].shape[1]) if m.training else None
            )

    summary = Trainer(cfg, write=False, quiet=True, callbacks=[rec, PerEpoch()]).fit()
    assert seen_tokens == {0: {17}, 1: {5}, 2: {9}}
    assert len(rec.indices[1]) < TRAIN_SIZE
    refresh = [e for e in summary["events"] if e["event"] == "patch_refresh"]
    assert [e["samples"] for e in refresh] == [len(rec.indices[1]), len(rec.indices[2])]  # only kept samples scored


def test_patch_tickets_from_a_file(tmp_path, tiny_cfg_dict):
    from data_tickets import TicketFile
    from data_tickets.patches import num_kept
    from lotus.features.patches.rankings_file import make_patch_ticket_file
    from lotus.models import create_model
    from lotus.weights import save_weights

    cfg0 = config_from_dict(tiny_cfg_dict)
    scorer = create_model(cfg0.model, 10, 1, 16)
    save_weights(scorer, tmp_path / "scorer.safetensors")
    made = make_patch_ticket_file(
        cfg0, str(tmp_path / "p.npz"), checkpoint=str(tmp_path / "scorer.safetensors"), keep_rate=0.5, progress=False
    )
    rank = TicketFile.load(tmp_path / "p.npz").patch_indices
    assert rank.shape == (TRAIN_SIZE, 8) and np.array_equal(rank, made.patch_indices)
    with pytest.raises(LotusError, match="--out: expected a .npz"):
        make_patch_ticket_file(cfg0, str(tmp_path / "p.txt"))
    tiny_cfg_dict["train"]["epochs"] = 1
    tiny_cfg_dict["train"]["max_steps"] = 5
    rec = Recorder()

    class KeepCheck(Callback):
        order = 300

        def transform_batch(self, trainer, images, labels, index):
            cb = next(c for c in trainer.callbacks if type(c).__name__ == "PatchTicketsCallback")
            keep = cb.keep_indices(trainer, images, index)
            expect = torch.sort(torch.from_numpy(rank[index.numpy(), :4].astype(np.int64)), 1).values
            assert torch.equal(keep, expect)
            return images, labels, index

    cfg = _cfg(
        tiny_cfg_dict, patches={"enabled": True, "source": "file", "file": str(tmp_path / "p.npz"), "keep_rate": 0.25}
    )
    Trainer(cfg, write=False, quiet=True, callbacks=[rec, KeepCheck()]).fit()
    assert {n for tr, n in rec.tokens if tr} == {1 + num_kept(16, 0.25)}
    # stored 8 patches per image: keep_rate 0.75 (12 patches) cannot be served
    bad = _cfg(
        tiny_cfg_dict, patches={"enabled": True, "source": "file", "file": str(tmp_path / "p.npz"), "keep_rate": 0.75}
    )
    with pytest.raises(LotusError, match=r"tickets.patches.file: .*keep_rate 0.75 needs 12"):
        Trainer(bad, write=False, quiet=True).fit()
    missing = _cfg(tiny_cfg_dict, patches={"enabled": True, "source": "file", "file": str(tmp_path / "nope.npz")})
    with pytest.raises(LotusError, match=r"tickets.patches.file: .*not found"):
        Trainer(missing, write=False, quiet=True).fit()
    other = dict(tiny_cfg_dict, model=dict(tiny_cfg_dict["model"], patch_size=2))
    with pytest.raises(LotusError, match="made for 16 patches per image, the model has 64"):
        Trainer(
            _cfg(other, patches={"enabled": True, "source": "file", "file": str(tmp_path / "p.npz"), "keep_rate": 0.1}),
            write=False,
            quiet=True,
        ).fit()


def test_patch_tickets_resume_matches_uninterrupted(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 2
    tiny_cfg_dict["data"]["limit_train"] = 400
    # epoch 1 reuses the rankings made at epoch 0, which the resumed run restores from state.pt
    cfg = _cfg(tiny_cfg_dict, patches={"enabled": True, "keep_rate": 0.5, "refresh_every": 2})
    full, resumed = _resume_matches(tmp_path, cfg, stop=1)
    assert [e["event"] for e in resumed.events].count("patch_refresh") == 1


def test_cls_attention_needs_a_class_token(tiny_cfg_dict):
    tiny_cfg_dict["model"]["kwargs"] = {"class_token": False, "global_pool": "avg"}
    cfg = _cfg(tiny_cfg_dict, patches={"enabled": True})
    with pytest.raises(LotusError, match="cls_attention needs a model with a class token"):
        Trainer(cfg, write=False, quiet=True).fit()


def test_shipped_configs_enable_the_sections():
    from pathlib import Path

    from lotus.config import load_config

    root = Path(__file__).resolve().parents[1]
    base = load_config(root / "configs/digits_preln.yaml")
    dyn = load_config(root / "configs/digits_dynamic.yaml")
    pat = load_config(root / "configs/digits_patches.yaml")
    assert dyn.tickets.dynamic.enabled and not dyn.tickets.patches.enabled
    assert pat.tickets.patches.enabled and not pat.tickets.dynamic.enabled
    for cfg in (dyn, pat):  # same run as the baseline apart from the tickets section
        for section in ("model", "data", "optim", "train"):
            assert getattr(cfg, section) == getattr(base, section), section
    from lotus.features.schedule.phases import Schedule

    sched = Schedule(pat).patch_keep_rates
    assert sched(0) == 1.0 and sched(base.train.epochs - 1) == 1.0 and sched.min_rate == 0.5
