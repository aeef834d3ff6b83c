import json
import os

import pytest
import torch

from lotus.callbacks import Callback
from lotus.config import config_from_dict
from lotus.errors import LotusError
from lotus.training import Trainer
from lotus.weights import read_state_dict


def test_training_learns_and_writes_outputs(tmp_path, tiny_cfg_dict):
    cfg = config_from_dict(tiny_cfg_dict)
    summary = Trainer(cfg, run_dir=str(tmp_path / "run"), quiet=True).fit()
    assert summary["final_val_acc"] > 0.3  # chance is 0.1
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.safetensors", "best.safetensors", "state.pt"):
        assert (run / name).is_file(), name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for key in (
        "step",
        "wall_s",
        "samples_seen",
        "train_loss",
        "val_loss",
        "val_acc",
        "throughput",
        "lr",
        "train_flops",
    ):
        assert key in epochs[-1], key
    assert epochs[-1]["samples_seen"] == 2 * 1437
    assert epochs[-1]["train_flops"] > 0
    assert json.loads((run / "summary.json").read_text())["final_val_acc"] == summary["final_val_acc"]
    sd = read_state_dict(run / "last.safetensors")
    assert "head.weight" in sd and not any("parametrizations" in k for k in sd)


def test_cpu_training_is_deterministic(tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 1
    tiny_cfg_dict["data"]["augment"] = {"random_crop": 1, "rotate": 5}
    tiny_cfg_dict["model"]["drop_path_rate"] = 0.1
    outs = []
    for _ in range(2):
        t = Trainer(config_from_dict(tiny_cfg_dict), write=False, quiet=True)
        t.fit()
        outs.append({k: v.clone() for k, v in t.model.state_dict().items()})
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


class _Interrupt(Callback):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            raise KeyboardInterrupt


def test_resume_matches_uninterrupted(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 3
    tiny_cfg_dict["data"]["augment"] = {"random_crop": 1, "random_erasing": 0.3}
    tiny_cfg_dict["model"]["drop_path_rate"] = 0.1
    cfg = config_from_dict(tiny_cfg_dict)
    full = Trainer(cfg, run_dir=str(tmp_path / "full"), quiet=True)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, callbacks=[_Interrupt()]).fit()
    resumed = Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, resume=True)
    summary = resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["epochs"] == 3 and summary["steps"] == full.step
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines if json.loads(x)["type"] == "epoch"] == [1, 2, 3]


def test_refuses_to_overwrite_a_run(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 1
    cfg = config_from_dict(tiny_cfg_dict)
    Trainer(cfg, run_dir=str(tmp_path / "r"), quiet=True).fit()
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(LotusError, match="already holds a run"):
        Trainer(cfg, run_dir=str(tmp_path / "r"), quiet=True).fit()
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


class _Poison(Callback):
    def per_sample_loss(self, trainer, loss, index):
        return loss * float("nan") if trainer.epoch == 1 and trainer.step >= trainer.steps_per_epoch + 3 else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_cfg_dict):
    cfg = config_from_dict(tiny_cfg_dict)
    step = -(-1437 // cfg.data.batch_size) + 4  # 4th step of epoch 2
    with pytest.raises(LotusError, match=rf"loss became nan at step {step} \(epoch 2\)"):
        Trainer(cfg, run_dir=str(tmp_path / "r"), quiet=True, callbacks=[_Poison()]).fit()
    sd = read_state_dict(tmp_path / "r" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    state = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
    assert state["epoch"] == 1


def test_callback_hooks_fire_in_order(tiny_cfg_dict):
    seen = []

    class Rec(Callback):
        def on_fit_start(self, t):
            seen.append("fit_start")

        def on_epoch_start(self, t, e):
            seen.append(f"epoch_start{e}")

        def on_step_end(self, t, s):
            seen.append("step") if s == 1 else None

        def on_epoch_end(self, t, e, m):
            m["custom"] = 1
            seen.append(f"epoch_end{e}")

        def on_fit_end(self, t, s):
            seen.append("fit_end")

    class Subset(Callback):
        order = -1

        def on_epoch_start(self, t, e):
            t.subset = list(range(0, 200))

    tiny_cfg_dict["train"]["epochs"] = 1
    t = Trainer(config_from_dict(tiny_cfg_dict), callbacks=[Rec(), Subset()], write=False, quiet=True)
    t.fit()
    assert seen == ["fit_start", "epoch_start0", "step", "epoch_end0", "fit_end"]
    assert t.samples_seen == 200


def test_load_weights_errors(tmp_path, tiny_cfg_dict):
    from lotus.models import create_model
    from lotus.weights import load_weights, save_weights

    cfg = config_from_dict(tiny_cfg_dict)
    m = create_model(cfg.model, 10, 1)
    save_weights(m, tmp_path / "w.safetensors")
    m2 = create_model(cfg.model, 10, 1)
    load_weights(m2, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    torch.save(m.state_dict(), tmp_path / "w.pt")
    load_weights(m2, tmp_path / "w.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LotusError, match="not a readable"):
        load_weights(m2, tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(LotusError, match="not a readable"):
        load_weights(m2, tmp_path / "bad.pt")
    with pytest.raises(LotusError, match="file not found"):
        load_weights(m2, tmp_path / "nope.pt")
    other = create_model(
        config_from_dict({"model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 2}}).model, 10, 1
    )
    with pytest.raises(LotusError, match="does not fit model"):
        load_weights(other, tmp_path / "w.safetensors")
    five = create_model(cfg.model, 5, 1)
    with pytest.warns(UserWarning, match="classifier"):
        load_weights(five, tmp_path / "w.safetensors")
    # a pickle payload is refused by weights_only loading
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(LotusError):
        load_weights(m2, tmp_path / "evil.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    from lotus.safe_io import atomic_write, atomic_write_text

    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_resume_of_finished_run_is_refused_and_keeps_results(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["train"]["epochs"] = 1
    cfg = config_from_dict(tiny_cfg_dict)
    Trainer(cfg, run_dir=str(tmp_path / "r"), quiet=True).fit()
    before = (tmp_path / "r" / "summary.json").read_text()
    with pytest.raises(LotusError, match="already finished"):
        Trainer(cfg, run_dir=str(tmp_path / "r"), quiet=True, resume=True).fit()
    assert (tmp_path / "r" / "summary.json").read_text() == before


def test_max_steps_still_evaluates_and_best_without_saving(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["train"].update(epochs=4, max_steps=5, eval_every=3)
    tiny_cfg_dict["output"] = {"save_best": False}
    s = Trainer(config_from_dict(tiny_cfg_dict), run_dir=str(tmp_path / "r"), quiet=True).fit()
    assert s["steps"] == 5 and s["final_val_acc"] is not None and s["best_val_acc"] == s["final_val_acc"]
    assert not (tmp_path / "r" / "best.safetensors").exists()
    mode = os.stat(tmp_path / "r" / "last.safetensors").st_mode & 0o777
    assert mode & 0o044  # readable by others like any file the user creates (umask permitting)


def test_resume_with_incompatible_model_is_one_line(tmp_path, tiny_cfg_dict, capsys):
    import yaml

    from lotus.cli import main

    tiny_cfg_dict["train"]["epochs"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_cfg_dict))
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    code = main(["train", "--resume", str(tmp_path / "r"), "--set", "train.epochs=2", "--set", "model.patch_size=8"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit this config" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "afile"), "--quiet"]) == 2
