"""Data tickets inside lotus: `lotus select`, training on tickets.file, the lotus proxy, error exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from data_tickets import TicketFile, score
from lotus.callbacks import Callback
from lotus.cli import main
from lotus.config import config_from_dict, load_config
from lotus.errors import LotusError
from lotus.training import Trainer

SMALL = ["--set", "data.limit_train=300"]  # 300 train images: fast proxies and fingerprints


@pytest.fixture
def small_yaml(tmp_path, tiny_cfg_dict):
    tiny_cfg_dict["data"]["limit_train"] = 300
    tiny_cfg_dict["train"]["epochs"] = 1
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    return path


@pytest.fixture
def small_bundle(small_yaml):
    from lotus.data import build_datasets

    cfg = load_config(small_yaml)
    return build_datasets(cfg.data, cfg.model.img_size, cfg.model.in_chans)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


class SeenIndices(Callback):
    def __init__(self):
        self.seen: list[int] = []

    def transform_batch(self, trainer, images, labels, index):
        self.seen.extend(index.tolist())
        return images, labels, index


def test_select_writes_ticket_and_training_uses_only_it(tmp_path, capsys, small_yaml, small_bundle):
    out = tmp_path / "t" / "loss30.npz"
    code, stdout, err = run_cli(
        capsys,
        "select",
        "--config",
        small_yaml,
        "--scorer",
        "loss",
        "--policy",
        "top",
        "--fraction",
        0.3,
        "--proxy-epochs",
        1,
        "--class-balance",
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["count"] == 90 and info["train_size"] == 300
    t = TicketFile.load(out)
    assert t.count == 90 and t.scores.shape == (300,) and t.scorer == "loss" and t.policy == "top"
    assert t.proxy["trainer"] == "lotus.training.Trainer" and t.proxy["epochs"] == 1
    t.validate_against(small_bundle.train, labels=small_bundle.labels_train)
    labels = small_bundle.labels_train
    assert (
        np.array_equal(
            np.bincount(labels[t.indices], minlength=10),  # class balanced
            np.round(np.bincount(labels, minlength=10) * 0.3).astype(int),
        )
        or abs(np.bincount(labels[t.indices], minlength=10) - np.bincount(labels, minlength=10) * 0.3).max() < 1
    )

    seen = SeenIndices()
    cfg = load_config(small_yaml, [f"tickets.file={out}"])
    trainer = Trainer(cfg, callbacks=[seen], run_dir=str(tmp_path / "run"), quiet=True)
    summary = trainer.fit()
    assert sorted(seen.seen) == sorted(t.indices.tolist())  # exactly the ticket, once per epoch
    assert summary["samples_seen"] == 90
    ev = [e for e in summary["events"] if e["event"] == "tickets"]
    assert ev and ev[0]["count"] == 90 and ev[0]["scorer"] == "loss"


def test_select_random_needs_no_scoring_and_reuses_scores(tmp_path, capsys, small_yaml):
    a = tmp_path / "random.npz"
    code, _, err = run_cli(
        capsys,
        "select",
        "--config",
        small_yaml,
        "--policy",
        "random",
        "--count",
        50,
        "--seed",
        3,
        "--out",
        a,
        "--quiet",
    )
    assert code == 0, err
    ta = TicketFile.load(a)
    assert ta.count == 50 and ta.scorer is None and ta.scores is None and ta.seed == 3

    src = tmp_path / "scored.npz"
    cfg = load_config(small_yaml)
    from lotus.data import build_datasets

    data = build_datasets(cfg.data, 16, None)
    fake_scores = np.linspace(0, 1, 300).astype(np.float32)
    TicketFile.create(
        np.arange(10), dataset=data.train, labels=data.labels_train, scores=fake_scores, scorer="el2n", policy="top"
    ).save(src)
    b = tmp_path / "reused.npz"
    code, _, err = run_cli(
        capsys,
        "select",
        "--config",
        small_yaml,
        "--from-ticket",
        src,
        "--policy",
        "top",
        "--fraction",
        0.1,
        "--no-class-balance",
        "--out",
        b,
        "--quiet",
    )
    assert code == 0, err
    tb = TicketFile.load(b)
    assert tb.scorer == "el2n" and np.array_equal(tb.scores, fake_scores)
    assert tb.indices.tolist() == list(range(270, 300))  # the top 10% of the stored scores
    assert tb.class_balanced is False


def test_select_with_checkpoint_and_patch_tickets(tmp_path, capsys, small_yaml):
    cfg = load_config(small_yaml)
    Trainer(cfg, run_dir=str(tmp_path / "run"), quiet=True).fit()
    out = tmp_path / "ent.npz"
    code, _, err = run_cli(
        capsys,
        "select",
        "--config",
        small_yaml,
        "--checkpoint",
        tmp_path / "run",
        "--scorer",
        "entropy",
        "--policy",
        "ccs",
        "--beta",
        0.2,
        "--fraction",
        0.5,
        "--patches",
        0.5,
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err
    t = TicketFile.load(out)
    assert t.count == 150 and t.proxy["checkpoint"].endswith("best.safetensors")
    assert t.patch_indices.shape == (300, 16)  # micro ViT at 16 px / patch 4: every patch ranked
    assert (np.sort(t.patch_indices, axis=1) == np.arange(16)).all()
    assert t.extra["patches"]["keep_rate"] == 0.5 and t.extra["policy_options"] == {"beta": 0.2}


def test_lotus_proxy_forgetting_and_determinism(small_yaml):
    from data_tickets.proxy import Proxy  # noqa: F401  (protocol documented there)
    from lotus.data import build_datasets
    from lotus.features.tickets.proxy import make_proxy

    cfg = load_config(small_yaml)
    proxy = make_proxy(cfg, epochs=2)
    data = build_datasets(cfg.data, 16, None)
    epochs_seen = []
    m1 = proxy(5, lambda m, e: epochs_seen.append((e, m.training)))
    assert epochs_seen == [(1, False), (2, False)] or [e for e, _ in epochs_seen] == [1, 2]
    m2 = proxy(5)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    f = score(None, data.train, "forgetting", proxy=proxy, progress=False)
    assert f.shape == (300,) and bool((f >= 0).all())
    assert proxy.config["trainer"] == "lotus.training.Trainer"


def _ticket_for(bundle, indices, **kw) -> TicketFile:
    return TicketFile.create(indices, dataset=bundle.train, labels=bundle.labels_train, **kw)


def test_train_rejects_bad_ticket_files(tmp_path, capsys, small_yaml, small_bundle):
    missing = tmp_path / "missing.npz"
    code, _, err = run_cli(
        capsys, "train", "--config", small_yaml, "--set", f"tickets.file={missing}", "--out", tmp_path / "r1", "--quiet"
    )
    assert code == 2 and err.strip() == f"error: tickets.file: ticket file {missing}: not found"

    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    code, _, err = run_cli(
        capsys, "train", "--config", small_yaml, "--set", f"tickets.file={bad}", "--out", tmp_path / "r2", "--quiet"
    )
    assert code == 2 and "not a valid .npz ticket file" in err and len(err.strip().splitlines()) == 1

    other = tmp_path / "other.npz"  # made for the full digits train split, not the 300-image one
    from lotus.data import build_datasets

    full = build_datasets(load_config(small_yaml, ["data.limit_train=null"]).data, 16, None)
    _ticket_for(full, np.arange(20)).save(other)
    code, _, err = run_cli(
        capsys, "train", "--config", small_yaml, "--set", f"tickets.file={other}", "--out", tmp_path / "r3", "--quiet"
    )
    assert code == 2 and "dataset fingerprint mismatch: dataset size differs (file 1437, dataset 300)" in err

    oob = tmp_path / "oob.npz"
    TicketFile(indices=[1, 2, 400]).save(oob)  # no fingerprint: the range is checked against the train split
    code, _, err = run_cli(
        capsys, "train", "--config", small_yaml, "--set", f"tickets.file={oob}", "--out", tmp_path / "r4", "--quiet"
    )
    assert code == 2 and "out of range [0, 300)" in err

    code, _, err = run_cli(capsys, "train", "--config", small_yaml, "--set", "tickets.file=t.txt", "--quiet")
    assert code == 2 and "tickets.file: expected a ticket .npz file" in err
    code, _, err = run_cli(capsys, "train", "--config", small_yaml, "--set", "tickets.fil=t.npz", "--quiet")
    assert code == 2 and "tickets.fil" in err


def test_select_rejects_bad_arguments(tmp_path, capsys, small_yaml, small_bundle):
    exists = tmp_path / "exists.npz"
    exists.write_bytes(b"keep me")
    cases = [
        (["--policy", "random", "--fraction", 0.5, "--out", exists], "already exists (pass --force"),
        (
            ["--policy", "random", "--fraction", 1.5, "--out", tmp_path / "a.npz"],
            "--fraction: expected a number in (0, 1]",
        ),
        (["--policy", "random", "--count", 301, "--out", tmp_path / "a.npz"], "count: expected an integer in 1..300"),
        (["--policy", "random", "--fraction", 0.5, "--out", tmp_path / "a.txt"], "--out: expected a .npz"),
        (
            [
                "--scorer",
                "loss",
                "--checkpoint",
                tmp_path / "nope.safetensors",
                "--fraction",
                0.5,
                "--out",
                tmp_path / "a.npz",
            ],
            "--checkpoint: file not found",
        ),
        (
            ["--policy", "top", "--beta", 0.1, "--fraction", 0.5, "--out", tmp_path / "a.npz"],
            "--beta/--strata: only used by --policy ccs",
        ),
        (
            ["--policy", "top", "--from-ticket", exists, "--fraction", 0.5, "--out", tmp_path / "a.npz"],
            "--from-ticket: ticket file",
        ),
        (
            ["--scorer", "prototype", "--repeats", 2, "--fraction", 0.5, "--out", tmp_path / "a.npz"],
            "--repeats: not used by --scorer prototype",
        ),
        (
            ["--scorer", "cls_attention", "--layer", "last", "--fraction", 0.5, "--out", tmp_path / "a.npz"],
            "--layer: expected a block index or 'rollout'",
        ),
        (
            ["--scorer", "forgetting", "--proxy-epochs", 1, "--fraction", 0.5, "--out", tmp_path / "a.npz"],
            "forgetting needs >= 2 epochs",
        ),
        (["--scorer", "loss", "--proxy-epochs", 0, "--fraction", 0.5, "--out", tmp_path / "a.npz"], "--proxy-epochs"),
    ]
    for extra, msg in cases:
        code, _, err = run_cli(capsys, "select", "--config", small_yaml, "--quiet", *extra)
        assert code == 2, (extra, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (msg, err)
    assert exists.read_bytes() == b"keep me"  # nothing overwritten
    code, _, err = run_cli(capsys, "select", "--config", small_yaml, "--fraction", 0.5, "--count", 3)
    assert code == 2 and "not allowed with argument" in err  # argparse: --fraction and --count are exclusive


def test_resume_refuses_a_changed_ticket(tmp_path, small_yaml, small_bundle):
    path = tmp_path / "t.npz"
    _ticket_for(small_bundle, np.arange(0, 300, 3)).save(path)
    cfg = load_config(small_yaml, [f"tickets.file={path}", "train.epochs=2"])

    class Stop(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir=str(tmp_path / "run"), quiet=True, callbacks=[Stop()]).fit()
    _ticket_for(small_bundle, np.arange(1, 300, 3)).save(path)
    with pytest.raises(LotusError, match="changed since this run started"):
        Trainer(cfg, run_dir=str(tmp_path / "run"), quiet=True, resume=True).fit()


def test_cli_process_exit_code_without_traceback(tmp_path, small_yaml):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lotus",
            "select",
            "--config",
            str(small_yaml),
            "--policy",
            "random",
            "--from-ticket",
            str(tmp_path / "none.npz"),
            "--fraction",
            "0.5",
            "--out",
            str(tmp_path / "o.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --from-ticket: ticket file") and "Traceback" not in r.stderr


def test_select_patches_from_a_cached_proxy(tmp_path, capsys, small_yaml, monkeypatch):
    fits = []
    orig = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fits.append(1) or orig(self))
    out = tmp_path / "p.npz"
    code, _, err = run_cli(
        capsys,
        "select",
        "--config",
        small_yaml,
        "--scorer",
        "cls_attention",
        "--layer",
        "rollout",
        "--proxy-epochs",
        1,
        "--policy",
        "top",
        "--fraction",
        0.5,
        "--patches",
        0.25,
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err
    assert len(fits) == 1  # one proxy training serves the sample scores and the patch ranking
    t = TicketFile.load(out)
    assert t.patch_indices.shape == (300, 16) and t.extra["scorer_options"] == {"layer": "rollout"}
    assert t.extra["patches"]["num_patches"] == 16


@pytest.mark.parametrize("qk_norm", ["rms", "tanh"])
def test_cls_attention_on_op_block_vits(qk_norm):
    """q/k recomputation also matches the OP block's attention (RMS-normed q/k, or soft-capped logits)."""
    from data_tickets.attention import cls_attention
    from lotus.models import create_model

    cfg = config_from_dict(
        {
            "model": {
                "name": "lotus_vit_micro",
                "img_size": 16,
                "patch_size": 4,
                "block": "op",
                "op": {"qk_norm": qk_norm, "softcap": 2.0},
            }
        }
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, 10, 1, 16).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(6.0)  # large logits, so the soft cap matters
    attn = model.blocks[-1].attn
    if hasattr(attn, "fused_attn"):
        attn.fused_attn = False  # reference path only
    captured = {}
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("a", o.detach()))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        model(x)
    h.remove()
    ref = captured["a"].mean(1)[:, 0, 1:]
    torch.testing.assert_close(cls_attention(model, x), ref / ref.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
