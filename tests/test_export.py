"""`lotus export`: a run (dense, thinned, OP) rebuilt in a fresh interpreter by the generated load.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pruning
from lotus.cli import main
from lotus.config import config_from_dict
from lotus.data import build_datasets
from lotus.data_meta import read_data_metadata
from lotus.models import create_model
from lotus.training import Trainer
from lotus.weights import load_weights, save_weights
from lotus.weights_meta import read_model_metadata

ROOT = Path(__file__).resolve().parents[1]

# Run in the export folder: load the model with load.py, compare with the expected logits, report what it imported.
_CHECK = """
import json, sys
import torch
from safetensors.torch import load_file
from load import load_model
want = load_file(sys.argv[1])
with torch.no_grad():
    got = load_model()(want["x"])
assert torch.allclose(got, want["logits"], rtol=1e-5, atol=1e-6), (got - want["logits"]).abs().max()
mods = {m: getattr(sys.modules[m], "__file__", None) for m in ("lotus", "pruning") if m in sys.modules}
print(json.dumps({"equal": torch.equal(got, want["logits"]), "modules": mods}))
"""

# Plain timm in a fresh interpreter: timm's local-dir loader and its data config, nothing of Lotus.
_TIMM_CHECK = """
import json, sys
import timm, torch
from safetensors.torch import load_file
model = timm.create_model("local-dir:" + sys.argv[2], pretrained=True).eval()
want = load_file(sys.argv[1])
with torch.no_grad():
    got = model(want["x"])
cfg = timm.data.resolve_data_config(model=model)
print(json.dumps({"equal": torch.equal(got, want["logits"]),
                  "lotus": "lotus" in sys.modules or "pruning" in sys.modules,
                  "data": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                  "labels": list(model.pretrained_cfg["label_names"])}))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import TINY

    d = json.loads(json.dumps(TINY))
    d["train"].update(epochs=1, max_steps=6)
    cfg = config_from_dict(d)
    run = tmp_path_factory.mktemp("export") / "run"
    Trainer(cfg, run_dir=str(run), quiet=True).fit()
    return run, cfg


def _expected(tmp: Path, model: torch.nn.Module, chans: int = 1, size: int = 16) -> Path:
    x = torch.randn(3, chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(x)
    path = tmp / "expected.safetensors"
    save_file({"x": x, "logits": logits.contiguous()}, path)
    return path


def _load_in_fresh_python(folder: Path, expected: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # so `pruning` / `lotus.models.op_block` are this checkout's
    r = subprocess.run(
        [sys.executable, "-c", _CHECK, str(expected)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _lotus_model(cfg, path):
    model = create_model(cfg.model, 10, 1, 16)
    return load_weights(model, path)


def test_export_a_dense_run_loads_with_timm_alone(run_dir, tmp_path, capsys):
    run, cfg = run_dir
    expected = _expected(tmp_path, _lotus_model(cfg, run / "best.safetensors"))
    out = tmp_path / "dense"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "timm alone loads it" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "load.py", "model.safetensors"]
    conf = json.loads((out / "config.json").read_text())
    assert (conf["name"], conf["img_size"], conf["patch_size"], conf["in_chans"], conf["num_classes"]) == (
        "lotus_vit_micro",
        16,
        4,
        1,
        10,
    )
    assert conf["thinned"] is False and conf["block"] == "pre_ln" and conf["timm_loadable"] and not conf["needs"]
    # lotus_vit_micro is exported as the plain timm ViT it is, its sizes in model_args
    assert conf["architecture"] == "vit_tiny_patch16_224" and conf["model_args"]["embed_dim"] == 64
    # the run's normalisation and class names travel with the weights (run checkpoint -> export)
    data = read_data_metadata(run / "best.safetensors")
    bundle = build_datasets(cfg.data, 16, None, cfg.model)
    assert data["mean"] == bundle.val.mean.flatten().tolist() and data["classes"] == [str(i) for i in range(10)]
    assert conf["pretrained_cfg"]["mean"] == data["mean"] and conf["label_names"] == data["classes"]
    assert read_data_metadata(out / "model.safetensors") == data
    r = subprocess.run(
        [sys.executable, "-c", _TIMM_CHECK, str(expected), str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    plain = json.loads(r.stdout.strip().splitlines()[-1])
    assert plain["equal"] and not plain["lotus"] and plain["labels"] == data["classes"]
    assert plain["data"]["mean"] == data["mean"] and plain["data"]["std"] == data["std"]
    assert plain["data"]["input_size"] == [1, 16, 16] and plain["data"]["crop_mode"] == "squash"
    assert "timm alone loads it" in (out / "README.md").read_text()
    loader = (out / "load.py").read_text()
    assert "pruning" not in loader and "lotus." not in loader
    res = _load_in_fresh_python(out, expected)
    assert res["equal"] and res["modules"] == {}  # timm alone: neither lotus nor pruning imported
    # plain timm keys; the exported file is itself a self-describing Lotus checkpoint
    assert set(load_file(out / "model.safetensors")) == set(create_model(cfg.model, 10, 1).state_dict())
    assert read_model_metadata(out / "model.safetensors")["img_size"] == 16


def test_export_thinned_weights(run_dir, tmp_path, capsys):
    run, cfg = run_dir
    model = _lotus_model(cfg, run / "best.safetensors")
    pruning.prune_(model, pruning.StructuredConfig(heads=0.5, mlp=0.5))
    thin = tmp_path / "thin.safetensors"
    save_weights(model, thin, {"model": cfg.model.name}, model_cfg=cfg.model)  # as the Trainer will write it
    expected = _expected(tmp_path, model)
    out = tmp_path / "thin"
    assert main(["export", str(thin), "--out", str(out)]) == 0
    assert "pruning.apply_widths" in capsys.readouterr().out
    conf = json.loads((out / "config.json").read_text())
    assert conf["thinned"] and conf["widths"] == {b: {"heads": 1, "mlp": 64} for b in ("blocks.0", "blocks.1")}
    assert not conf["timm_loadable"] and "timm alone cannot load it" in (out / "README.md").read_text()
    assert "lotus-vit" not in (out / "load.py").read_text() and "pip install -e ." in (out / "load.py").read_text()
    assert "apply_widths(model" in (out / "load.py").read_text()
    assert load_file(out / "model.safetensors")["blocks.0.mlp.fc1.weight"].shape == (64, 64)
    res = _load_in_fresh_python(out, expected)
    assert res["equal"] and res["modules"]["pruning"].startswith(str(ROOT))
    # refuses a non-empty --out; --force rewrites it
    assert main(["export", str(thin), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(thin), "--out", str(out), "--force"]) == 0


def test_export_op_blocks_and_timm_kwargs(tmp_path):
    cfg = config_from_dict(
        {
            "model": {
                "name": "vit_tiny_patch16_224",
                "img_size": 16,
                "patch_size": 4,
                "block": "op",
                "op": {"input_scale": 0.5},
                "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
            }
        }
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, 5, 3)
    pruning.prune_(model, pruning.StructuredConfig(mlp=0.25))
    src = tmp_path / "op.safetensors"
    save_weights(model, src, model_cfg=cfg.model)
    expected = _expected(tmp_path, model, chans=3)
    out = tmp_path / "op"
    assert main(["export", str(src), "--out", str(out)]) == 0
    loader = (out / "load.py").read_text()
    assert "from lotus.models.op_block import OPConfig, op_model_kwargs" in loader and "apply_widths" in loader
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_args"]["depth"] == 2 and conf["op"]["input_scale"] == 0.5
    assert _load_in_fresh_python(out, expected)["equal"]


def test_export_errors_are_one_line(run_dir, tmp_path, capsys):
    run, cfg = run_dir

    def err(argv):
        assert main(["export", *argv]) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("error: ") and "\n" not in e
        return e

    assert "no such run directory or file" in err([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert "has no best.safetensors" in err([str(empty), "--out", str(tmp_path / "o")])
    assert "--which: only for a run directory" in err(
        [str(run / "last.safetensors"), "--which", "last", "--out", str(tmp_path / "o")]
    )
    anon = tmp_path / "anon" / "w.pt"
    anon.parent.mkdir()
    torch.save(create_model(cfg.model, 10, 1).state_dict(), anon)
    assert "records no model section" in err([str(anon), "--out", str(tmp_path / "o")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a folder" in err([str(run), "--out", str(afile)])
    assert not (tmp_path / "o").exists()
    assert main(["export", str(anon), "--config", str(run / "config.yaml"), "--out", str(tmp_path / "o")]) == 0
    assert main(["export", str(run), "--which", "last", "--out", str(tmp_path / "last")]) == 0
