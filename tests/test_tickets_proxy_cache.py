"""The proxy cache: one proxy training per seed shared by scorers and `lotus select` runs; stale or corrupt
entries are retrained; replays give exactly the fresh proxy's scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from data_tickets import TicketFile, make_proxy, score
from data_tickets.proxy_cache import cached_proxy, proxy_fingerprint
from lotus.cli import main
from lotus.training import Trainer


class Blobs(Dataset):
    def __init__(self, n: int = 120):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        self.x = torch.randn(n, 8, generator=g) + 1.5 * nn.functional.one_hot(self.labels, 8).float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), i


def mlp(hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))


KEY = {"data": "blobs-120", "model": "mlp16", "epochs": 3}


@pytest.fixture
def counted(one_thread):
    ds = Blobs()
    base = make_proxy(mlp, ds, epochs=3, lr=1e-2, batch_size=32, progress=False)
    calls: list[int] = []

    def proxy(seed, on_epoch_end=None):
        calls.append(seed)
        return base(seed, on_epoch_end)

    proxy.config = base.config
    return ds, base, proxy, calls


def test_scorers_share_one_training_per_seed_and_replays_match_fresh(tmp_path, counted):
    ds, fresh, proxy, calls = counted
    logs: list[str] = []
    p = cached_proxy(proxy, mlp, tmp_path, KEY, log=logs.append)
    f1 = score(None, ds, "forgetting", proxy=p, seed=5, progress=False)
    e1 = score(None, ds, "el2n", proxy=p, seed=5, repeats=2, progress=False)
    assert calls == [5, 6]  # el2n's first proxy is forgetting's (seed 5): only seed 6 trained on top
    assert p.stats == {"trained": 2, "reused": 1} and p.config == fresh.config

    p2 = cached_proxy(proxy, mlp, tmp_path, KEY, log=logs.append)  # a later run: nothing trains
    f2 = score(None, ds, "forgetting", proxy=p2, seed=5, progress=False)
    e2 = score(None, ds, "el2n", proxy=p2, seed=5, repeats=2, progress=False)
    assert calls == [5, 6] and p2.stats == {"trained": 0, "reused": 3}
    fp = proxy_fingerprint(KEY, 5)
    assert any(m.startswith(f"reusing proxy {fp}") for m in logs)
    assert torch.equal(f1, f2) and torch.equal(e1, e2)
    assert torch.equal(f2, score(None, ds, "forgetting", proxy=fresh, seed=5, progress=False))
    assert torch.equal(e2, score(None, ds, "el2n", proxy=fresh, seed=5, repeats=2, progress=False))

    path = tmp_path / f"proxy-{fp}.safetensors"
    with safe_open(str(path), "pt") as f:  # plain tensors + string metadata: nothing to unpickle
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == "data-tickets-proxy" and json.loads(meta["epochs"]) == [1, 2, 3]
    assert meta["final"] == "last_epoch" and {n.split("/")[0] for n in names} == {"epoch1", "epoch2", "epoch3"}
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(
        f"proxy-{proxy_fingerprint(KEY, s)}.safetensors" for s in (5, 6)
    )  # no temp files left


def test_other_key_trains_again(tmp_path, counted):
    ds, _, proxy, calls = counted
    cached_proxy(proxy, mlp, tmp_path, KEY, log=None)(0)
    cached_proxy(proxy, mlp, tmp_path, {**KEY, "epochs": 4}, log=None)(0)
    cached_proxy(proxy, mlp, tmp_path, KEY, log=None)(1)
    assert calls == [0, 0, 1] and len(list(tmp_path.iterdir())) == 3


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:100])


def _old_format(path):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata(), format_version="0")
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "damage,model_fn,message",
    [
        (_corrupt, mlp, "unreadable"),
        (_old_format, mlp, "stale (format"),
        (lambda p: None, lambda: mlp(hidden=5), "stale (weights do not fit the model"),
    ],
)
def test_stale_or_corrupt_entries_are_recomputed(tmp_path, counted, damage, model_fn, message):
    ds, fresh, proxy, calls = counted
    cached_proxy(proxy, mlp, tmp_path, KEY, log=None)(3)
    path = tmp_path / f"proxy-{proxy_fingerprint(KEY, 3)}.safetensors"
    damage(path)
    logs: list[str] = []
    p = cached_proxy(proxy, model_fn, tmp_path, KEY, log=logs.append)
    f = score(None, ds, "forgetting", proxy=p, seed=3, progress=False)
    assert calls == [3, 3] and p.stats["trained"] == 1
    assert any(message in m and m.endswith("recomputing") and str(path) in m for m in logs), logs
    assert torch.equal(f, score(None, ds, "forgetting", proxy=fresh, seed=3, progress=False))
    again = cached_proxy(proxy, mlp, tmp_path, KEY, log=None)
    again(3)
    assert again.stats == {"trained": 0, "reused": 1}  # the rewritten entry is valid


def test_final_state_after_the_last_epoch_is_stored(tmp_path, one_thread):
    ds = Blobs()
    base = make_proxy(mlp, ds, epochs=2, lr=1e-2, progress=False)

    def proxy(seed, on_epoch_end=None):
        m = base(seed, on_epoch_end)
        with torch.no_grad():
            m[2].bias.add_(1.0)  # e.g. an EMA swap or a final fine-tune after the last epoch hook
        return m

    first = cached_proxy(proxy, mlp, tmp_path, KEY, log=None)(0)
    p = cached_proxy(proxy, mlp, tmp_path, KEY, log=None)
    seen = []
    replayed = p(0, lambda m, e: seen.append((e, m[2].bias.clone())))
    assert p.stats["reused"] == 1 and [e for e, _ in seen] == [1, 2]
    assert torch.equal(replayed[2].bias, first[2].bias) and torch.equal(seen[-1][1] + 1.0, first[2].bias)


# ---------------------------------------------------------------- lotus select


@pytest.fixture
def small_yaml(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["data"]["limit_train"] = 300
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_select_reuses_the_proxy_across_invocations(tmp_path, capsys, small_yaml, monkeypatch, one_thread):
    fits = []
    orig = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fits.append(self.cfg.train.epochs) or orig(self))
    common = ["select", "--config", small_yaml, "--proxy-epochs", 2, "--fraction", 0.3]
    code, _, err = run_cli(capsys, *common, "--scorer", "el2n", "--repeats", 1, "--out", tmp_path / "t" / "e.npz")
    assert code == 0, err
    assert fits == [2] and "training proxy" in err
    code, out, err = run_cli(
        capsys, *common, "--scorer", "forgetting", "loss", "--out", tmp_path / "t" / "{scorer}.npz"
    )
    assert code == 0, err
    assert fits == [2] and "reusing proxy" in err  # forgetting and loss replay el2n's proxy: no training
    assert [json.loads(x)["scorer"] for x in out.strip().splitlines()] == ["forgetting", "loss"]
    assert len(list((tmp_path / "t" / ".proxy-cache").iterdir())) == 1

    code, _, err = run_cli(
        capsys, *common, "--scorer", "forgetting", "--no-proxy-cache", "--quiet", "--out", tmp_path / "fresh.npz"
    )
    assert code == 0, err
    assert fits == [2, 2]
    cached, fresh = TicketFile.load(tmp_path / "t" / "forgetting.npz"), TicketFile.load(tmp_path / "fresh.npz")
    assert np.array_equal(cached.scores, fresh.scores) and np.array_equal(cached.indices, fresh.indices)
    assert not (tmp_path / ".proxy-cache").exists()  # --no-proxy-cache writes nothing

    code, _, err = run_cli(
        capsys,
        *common,
        "--scorer",
        "loss",
        "--proxy-epochs",
        3,
        "--quiet",
        "--proxy-cache",
        tmp_path / "t" / ".proxy-cache",
        "--out",
        tmp_path / "loss3.npz",
    )
    assert code == 0, err
    assert fits == [2, 2, 3]  # other proxy settings: another entry


def test_select_class_balance_default_and_opt_out(tmp_path, capsys, small_yaml, one_thread):
    for flag, expect in ((None, True), ("--no-class-balance", False), ("--class-balance", True)):
        out = tmp_path / f"{flag}.npz"
        code, stdout, err = run_cli(
            capsys,
            "select",
            "--config",
            small_yaml,
            "--policy",
            "random",
            "--count",
            50,
            *([flag] if flag else []),
            "--out",
            out,
            "--quiet",
        )
        assert code == 0, err
        t = TicketFile.load(out)
        assert t.class_balanced is expect and json.loads(stdout)["class_balanced"] is expect
        assert sum(t.extra["class_counts"]) == 50
        if expect:
            assert max(t.extra["class_counts"]) - min(t.extra["class_counts"]) <= 1  # digits: ~equal classes
    code, _, err = run_cli(
        capsys,
        "select",
        "--config",
        small_yaml,
        "--scorer",
        "el2n",
        "loss",
        "--fraction",
        0.3,
        "--out",
        tmp_path / "one.npz",
        "--quiet",
    )
    assert code == 2 and "--out: several scorers (el2n loss) write one ticket each; put {scorer}" in err


@pytest.mark.parametrize("balanced", [True, False])
def test_reselect_selects_through_the_same_class_balance(balanced, one_thread):
    """schedule.reselect calls data_tickets.select with its class_balanced flag (default True) and the labels."""
    from types import SimpleNamespace

    from data_tickets import select
    from lotus.features.schedule.callback import ReselectCallback
    from lotus.features.schedule.config import ReselectConfig

    ds = Blobs(90)
    labels = ds.labels.numpy()
    torch.manual_seed(0)
    model = mlp().eval()
    logged = []
    trainer = SimpleNamespace(
        model=model,
        train_set=ds,
        labels_train=labels,
        device=torch.device("cpu"),
        cfg=SimpleNamespace(data=SimpleNamespace(eval_batch_size=32)),
        plan=SimpleNamespace(full_data=False, reselect=True, phase="reduce"),
        log=lambda event, **kw: logged.append(event),
    )
    cb = ReselectCallback(
        ReselectConfig(enabled=True, scorer="loss", policy="top", fraction=0.3, class_balanced=balanced), seed=4
    )
    idx = cb.epoch_subset(trainer, 2)
    scores = score(model, ds, "loss", progress=False)
    assert np.array_equal(idx, select(scores, "top", fraction=0.3, labels=labels, class_balanced=balanced, seed=6))
    assert logged == ["reselect"]
    if balanced:
        assert np.bincount(labels[idx], minlength=3).tolist() == [9, 9, 9]
    assert ReselectConfig().class_balanced is True
