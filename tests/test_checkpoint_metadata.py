"""Self-describing checkpoints: the recorded model section, its use as defaults, and one-line load errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

import pruning
from lotus.cli import main
from lotus.config import ModelConfig, config_from_dict
from lotus.errors import LotusError
from lotus.models import create_model
from lotus.weights import load_weights, save_weights
from lotus.weights_meta import model_config_from_checkpoint, model_metadata, read_metadata, read_model_metadata

# a timm ViT with model.kwargs (like beit with depth=4): the sizes and kwargs must survive a round trip
NATIVE = {
    "name": "vit_tiny_patch16_224",
    "img_size": 16,
    "patch_size": 4,
    "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}


def _model(model: dict, classes: int = 10, chans: int = 1):
    cfg = config_from_dict({"model": model})
    torch.manual_seed(0)
    return cfg.model, create_model(cfg.model, classes, chans, cfg.model.img_size or 16)


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_model_metadata_records_the_resolved_sizes(tmp_path):
    mcfg, model = _model({"name": "lotus_vit_micro"})  # sizes unset: the model's own (16 px, patch 4)
    meta = model_metadata(mcfg, model)
    assert {k: meta[k] for k in ("name", "img_size", "patch_size", "in_chans", "num_classes", "block", "op")} == {
        "name": "lotus_vit_micro",
        "img_size": 16,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 10,
        "block": "pre_ln",
        "op": None,
    }
    assert meta["widths"] == {"blocks.0": {"heads": 2, "mlp": 128}, "blocks.1": {"heads": 2, "mlp": 128}}
    mcfg, model = _model({**NATIVE, "block": "op", "op": {"input_scale": 0.5}}, classes=7, chans=3)
    save_weights(model, tmp_path / "w.safetensors", {"epoch": 3, "model": mcfg.name}, model_cfg=mcfg)
    sec = read_model_metadata(tmp_path / "w.safetensors")
    assert sec["kwargs"] == NATIVE["kwargs"] and sec["num_classes"] == 7 and sec["in_chans"] == 3
    assert sec["block"] == "op" and sec["op"]["input_scale"] == 0.5
    meta = read_metadata(tmp_path / "w.safetensors")
    assert meta["epoch"] == 3 and meta["widths"] == sec["widths"]
    # the recorded section rebuilds the model with no config at all
    rebuilt = create_model(model_config_from_checkpoint(ModelConfig(), tmp_path / "w.safetensors"), 2, 2)
    load_weights(rebuilt, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_old_files_still_load(tmp_path):
    mcfg, model = _model({"name": "lotus_vit_micro", "img_size": 16})
    save_weights(model, tmp_path / "plain.safetensors", {"model": "lotus_vit_micro"})  # no model_cfg: as before
    assert read_metadata(tmp_path / "plain.safetensors")["model"] == "lotus_vit_micro"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    old_meta = {"lotus": json.dumps({"epoch": 1, "model": "lotus_vit_micro"})}  # the format before model sections
    save_file(sd, tmp_path / "old.safetensors", metadata=old_meta)
    torch.save(sd, tmp_path / "old.pt")
    assert read_model_metadata(tmp_path / "old.safetensors") == {"name": "lotus_vit_micro"}
    assert read_model_metadata(tmp_path / "old.pt") is None
    for f in ("plain.safetensors", "old.safetensors", "old.pt"):
        load_weights(create_model(mcfg, 10, 1), tmp_path / f)
        assert model_config_from_checkpoint(mcfg, tmp_path / f).name == "lotus_vit_micro"


def test_given_keys_win_over_the_recorded_section(tmp_path):
    mcfg, model = _model({"name": "lotus_vit_micro", "img_size": 16, "block": "op", "op": {"qk_norm": "tanh"}})
    path = tmp_path / "op.safetensors"
    save_weights(model, path, model_cfg=mcfg)
    base = ModelConfig()
    out = model_config_from_checkpoint(base, path, {})
    assert (out.name, out.img_size, out.patch_size, out.block) == ("lotus_vit_micro", 16, 4, "op")
    assert out.op.qk_norm == "tanh"
    out = model_config_from_checkpoint(
        ModelConfig(img_size=32, op={"softcap": 5.0}), path, {"img_size": 32, "op": {"softcap": 5.0}}
    )
    assert out.img_size == 32 and out.op.softcap == 5.0 and out.op.qk_norm == "tanh"  # op merges key by key
    other = ModelConfig(name="lotus_vit_tiny")
    assert model_config_from_checkpoint(other, path, {"name": "lotus_vit_tiny"}) is other  # another architecture
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, bad, metadata={"lotus": json.dumps({"model": {"name": "m", "img_size": "big"}})})
    with pytest.raises(LotusError, match=r"--checkpoint: .*bad.safetensors records a model section .*img_size"):
        model_config_from_checkpoint(base, bad)


def test_load_errors_name_the_tensor_and_the_file(tmp_path):
    mcfg, model = _model({"name": "lotus_vit_micro", "img_size": 16})
    pruning.prune_(model, pruning.StructuredConfig(mlp=0.5))
    torch.save(model.state_dict(), tmp_path / "thin.pt")  # thinned, but no widths anywhere: another tool wrote it
    with pytest.raises(LotusError) as e:
        load_weights(create_model(mcfg, 10, 1), tmp_path / "thin.pt", key="--checkpoint")
    msg = str(e.value)
    assert msg.startswith(f"--checkpoint: {tmp_path / 'thin.pt'} does not fit model: it has blocks.0.mlp.fc1.")
    assert "of shape (64" in msg and "the model expects (128" in msg and "thinned weights" in msg
    assert "another tool" in msg and "\n" not in msg
    # a file recorded for other sizes says which
    _, big = _model({"name": "lotus_vit_micro", "img_size": 32, "patch_size": 4})
    save_weights(
        big,
        tmp_path / "big.safetensors",
        model_cfg=config_from_dict({"model": {"name": "lotus_vit_micro", "img_size": 32}}).model,
    )
    with pytest.raises(
        LotusError,
        match=r"big.safetensors does not fit model: it has pos_embed of shape .*"
        r"written for model.img_size: 32; this model has 16\)$",
    ):
        load_weights(create_model(mcfg, 10, 1), tmp_path / "big.safetensors")


@pytest.mark.parametrize("recorded", [True, False])
def test_op_and_pre_ln_files_say_which_block(tmp_path, recorded):
    op_cfg, op_model = _model({"name": "lotus_vit_micro", "img_size": 16, "block": "op"})
    ln_cfg, ln_model = _model({"name": "lotus_vit_micro", "img_size": 16})
    ext = "safetensors" if recorded else "pt"
    for name, cfg, model in (("op", op_cfg, op_model), ("ln", ln_cfg, ln_model)):
        if recorded:
            save_weights(model, tmp_path / f"{name}.{ext}", model_cfg=cfg)
        else:
            torch.save(model.state_dict(), tmp_path / f"{name}.{ext}")  # no metadata: found by key names
    with pytest.raises(LotusError) as e:
        load_weights(create_model(ln_cfg, 10, 1), tmp_path / f"op.{ext}", key="--checkpoint")
    assert str(e.value) == (
        f"--checkpoint: {tmp_path / f'op.{ext}'} was trained with model.block: op (this model "
        "has pre_ln blocks); set model.block: op (or --set model.block=op)"
    )
    with pytest.raises(LotusError, match=r"was trained with model.block: pre_ln .*--set model.block=pre_ln\)$"):
        load_weights(create_model(op_cfg, 10, 1), tmp_path / f"ln.{ext}")


def test_prune_takes_the_model_from_the_checkpoint(tmp_path, capsys):
    mcfg, model = _model(NATIVE)  # not the timm default sizes (224 px, patch 16, depth 12)
    ckpt = tmp_path / "best.safetensors"
    save_weights(model, ckpt, {"epoch": 1, "model": mcfg.name}, model_cfg=mcfg)
    out = tmp_path / "p"
    assert (
        main(
            [
                "prune",
                "--checkpoint",
                str(ckpt),
                "--method",
                "structured",
                "--heads",
                "0.5",
                "--out",
                str(out),
                "--latency-iters",
                "0",
            ]
        )
        == 0
    )
    sec = read_model_metadata(out / "model.safetensors")
    assert sec["kwargs"] == NATIVE["kwargs"] and (sec["img_size"], sec["patch_size"], sec["in_chans"]) == (16, 4, 1)
    assert sec["widths"] == {"blocks.0": {"heads": 1, "mlp": 128}}
    # the pruned file prunes further, again with no model flags; explicit flags still win
    assert (
        main(
            [
                "prune",
                "--checkpoint",
                str(out / "model.safetensors"),
                "--method",
                "magnitude",
                "--out",
                str(tmp_path / "p2"),
                "--latency-iters",
                "0",
            ]
        )
        == 0
    )
    assert "--img-size" not in _err(
        capsys,
        [
            "prune",
            "--checkpoint",
            str(ckpt),
            "--img-size",
            "32",
            "--method",
            "magnitude",
            "--out",
            str(tmp_path / "p3"),
            "--latency-iters",
            "0",
        ],
    )
    torch.save(model.state_dict(), tmp_path / "anon.pt")
    err = _err(
        capsys,
        ["prune", "--checkpoint", str(tmp_path / "anon.pt"), "--method", "magnitude", "--out", str(tmp_path / "p4")],
    )
    assert "anon.pt records no model" in err and "--model NAME" in err


def test_outliers_select_use_the_recorded_block(tmp_path, capsys, tiny_cfg_dict):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"name": "lotus_vit_micro"}, "data": tiny_cfg_dict["data"]}))
    mcfg, model = _model({"name": "lotus_vit_micro", "img_size": 16, "block": "op"})
    ckpt = tmp_path / "op.safetensors"
    save_weights(model, ckpt, model_cfg=mcfg)
    assert (
        main(["outliers", "--config", str(cfg_path), "--checkpoint", str(ckpt), "--samples", "8", "--device", "cpu"])
        == 0
    )
    assert "block=op" in capsys.readouterr().out
    err = _err(
        capsys,
        [
            "outliers",
            "--config",
            str(cfg_path),
            "--checkpoint",
            str(ckpt),
            "--samples",
            "8",
            "--set",
            "model.block=pre_ln",
        ],
    )
    assert "was trained with model.block: op" in err
    assert (
        main(
            [
                "select",
                "--config",
                str(cfg_path),
                "--checkpoint",
                str(ckpt),
                "--scorer",
                "loss",
                "--policy",
                "top",
                "--fraction",
                "0.5",
                "--quiet",
                "--out",
                str(tmp_path / "t.npz"),
            ]
        )
        == 0
    )


def test_a_trainer_checkpoint_with_its_model_section_prunes_without_flags(tmp_path, tiny_cfg_dict, monkeypatch):
    """The Trainer's call `save_weights(bare, path, meta, state_dict=full, model_cfg=trainer.cfg.model)`."""
    import functools

    from lotus.training import Trainer, checkpointer

    tiny_cfg_dict["train"].update(epochs=1, max_steps=4)
    tiny_cfg_dict["model"] = {"name": "lotus_vit_micro", "kwargs": {"mlp_ratio": 3.0}}  # sizes left to the model
    cfg = config_from_dict(tiny_cfg_dict)
    monkeypatch.setattr(checkpointer, "save_weights", functools.partial(save_weights, model_cfg=cfg.model))
    Trainer(cfg, run_dir=str(tmp_path / "run"), quiet=True).fit()
    sec = read_model_metadata(tmp_path / "run" / "best.safetensors")
    assert (sec["img_size"], sec["patch_size"], sec["in_chans"], sec["kwargs"]) == (16, 4, 1, {"mlp_ratio": 3.0})
    assert (
        main(
            [
                "prune",
                "--checkpoint",
                str(tmp_path / "run" / "best.safetensors"),
                "--method",
                "structured",
                "--heads",
                "0.5",
                "--out",
                str(tmp_path / "p"),
                "--latency-iters",
                "0",
            ]
        )
        == 0
    )
