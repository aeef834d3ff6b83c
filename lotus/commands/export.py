"""Export a run's weights for use without Lotus' training code: plain timm weights, their config, a loader.

From a run directory (its best.safetensors, or last.safetensors with --which last) or a weights file, writes
into --out:

  model.safetensors  the plain timm state dict: masks folded into the weights, thinned shapes kept; its
                     metadata records the model section and the run's data (mean/std, classes)
  config.json        timm's local-dir layout: architecture (a timm entry point; Lotus' lotus_vit_* as the plain
                     vit_*_patch16_224 they are), num_classes, model_args, pretrained_cfg (input size, mean/std,
                     interpolation, crop), label_names; plus Lotus' model section (name, block, op, widths, ...)
  load.py            the few lines of Python that load it: timm.create_model("local-dir:FOLDER", pretrained=True)
                     whenever timm alone can; OP blocks and thinned widths are no timm architecture, then load.py
                     also imports lotus.models.op_block / pruning.apply_widths from the installed lotus package
                     (`pip install -e .` in a Lotus checkout; no package index has it)
  README.md          how to load it and preprocess images, its classes, and plainly whether timm alone loads it

Before anything is written, the export runs its load.py and checks that it gives the Lotus model's logits.

examples:
  lotus export runs/x --out exported/
  lotus export runs/x --which last --out exported/ --force
  lotus export pruned/model.safetensors --out exported/        # a `lotus prune` result (thinned widths kept)
  cd exported && python load.py
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

from lotus.config import ModelConfig, load_config
from lotus.errors import LotusError
from lotus.safe_io import TEMP_PREFIX, output_lock, refuse_symlink, remove_temps

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs
    import torch
    from torch import nn

__all__ = ["add_arguments", "run"]

_FILES = ("model.safetensors", "config.json", "load.py", "README.md")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR|FILE", help="a run directory or a .safetensors/state-dict file")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--which", choices=("best", "last"), help="run directory: best.safetensors (default) or last")
    p.add_argument(
        "--config",
        "-c",
        help="the training config, for files that record no model section "
        "(default: the config.yaml next to the weights)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (replacing its export files)")


# ------------------------------------------------------------------------------------------- inputs
def _weights_file(source: str, which: str | None) -> str:
    if os.path.isdir(source):
        path = os.path.join(source, f"{which or 'best'}.safetensors")
        if not os.path.isfile(path):
            other = "last" if (which or "best") == "best" else "best"
            hint = (
                f"; pass --which {other}"
                if os.path.isfile(os.path.join(source, f"{other}.safetensors"))
                else " (is it a run directory?)"
            )
            raise LotusError(f"export: {source} has no {os.path.basename(path)}{hint}")
        return path
    if not os.path.isfile(source):
        raise LotusError(f"export: no such run directory or file: {source}")
    if which:
        raise LotusError(f"--which: only for a run directory; {source} is a file")
    return source


def _check_out(out: str, force: bool) -> None:
    refuse_symlink(out, "--out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise LotusError(f"--out: {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise LotusError(
            f"--out: {out} is not empty (holds {min(os.listdir(out))}); pass --force to write "
            "into it or choose another --out"
        )


def _model_config(path: str, config: str | None) -> ModelConfig:
    """The recorded model section; a config (--config, or the run's config.yaml) fills in what it lacks."""
    from lotus.weights_meta import model_config_from_checkpoint, read_model_metadata

    section = read_model_metadata(path, "export")
    complete = bool(section) and "img_size" in section
    if config is None and not complete:
        run_cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
        config = run_cfg if os.path.isfile(run_cfg) else None
    if config is None and not section:
        raise LotusError(
            f"export: {path} records no model section (not written by Lotus, or by an older version) "
            "and has no config.yaml beside it; pass --config FILE"
        )
    if config is not None:
        cfg = load_config(config)
        base, given = cfg.model, dict(cfg.source.get("model") or {})
    else:
        base, given = ModelConfig(), {}
    mcfg = model_config_from_checkpoint(base, path, given, "export")
    return dataclasses.replace(mcfg, checkpoint=None, pretrained=False, drop_path_rate=0.0)


def _lotus_model(path: str, mcfg: ModelConfig) -> tuple[nn.Module, ModelConfig, dict | None]:
    """(model with the file's weights, its config with sizes filled in, its widths before loading)."""
    from lotus.commands.prune_inputs import checkpoint_shapes
    from lotus.models import create_model, resolve_img_size
    from lotus.weights import load_weights
    from lotus.weights_meta import model_metadata

    classes, chans = checkpoint_shapes(path, mcfg.name)
    mcfg = dataclasses.replace(mcfg, num_classes=mcfg.num_classes or classes, in_chans=mcfg.in_chans or chans)
    model = create_model(mcfg, mcfg.num_classes or 1000, mcfg.in_chans or 3, resolve_img_size(mcfg))
    default_widths = model_metadata(None, model)["widths"]
    load_weights(model, path, key="export")
    return model.eval(), mcfg, default_widths


# ------------------------------------------------------------------------------------------- check + write
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _verify(folder: str, model: nn.Module, cfg: dict) -> None:
    """Run the written load.py in this process; its model must give the Lotus model's logits."""
    import torch

    name = f"_lotus_export_check_{os.getpid()}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "load.py"))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        rebuilt = module.load_model()
    except Exception as e:  # noqa: BLE001 - a loader that cannot run is a failed export
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LotusError(
            f"export: the generated load.py cannot rebuild {cfg['name']} ({first}); nothing written"
        ) from None
    finally:
        sys.modules.pop(name, None)
    x = torch.randn(2, *cfg["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(0))
    want, got = _logits(model, x), _logits(rebuilt, x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        diff = (want - got).abs().max().item() if want.shape == got.shape else f"shape {tuple(got.shape)}"
        raise LotusError(
            f"export: the generated load.py rebuilds {cfg['name']} with other logits ({diff}); nothing written"
        )


def _temp_dir(out: str) -> str:
    """A Lotus-named temp folder beside ``out`` (what a killed export to ``out`` left is removed first)."""
    parent, name = os.path.split(os.path.abspath(out).rstrip(os.sep))
    try:
        remove_temps(parent, name)
        return tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name[:80]}-", dir=parent)
    except OSError as e:
        raise LotusError(f"--out: cannot write {out}: {e.strerror or e}") from None


def _publish(tmp: str, out: str) -> None:
    """Move the checked files into ``out`` (one rename when it does not exist yet)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    for f in _FILES:
        os.replace(os.path.join(tmp, f), os.path.join(out, f))
    shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from lotus.safe_io import atomic_write_text
    from lotus.weights import save_weights

    path = _weights_file(args.source, args.which)
    _check_out(args.out, args.force)
    if args.config and not os.path.isfile(args.config):
        raise LotusError(f"--config: config file not found: {args.config}")
    from lotus.commands.export_content import config_json, export_data_metadata, load_py, readme

    model, mcfg, default_widths = _lotus_model(path, _model_config(path, args.config))
    data = export_data_metadata(path, args.config)
    cfg = config_json(model, mcfg, default_widths, path, data)
    with output_lock(args.out, "--out"):  # a second export to this --out is refused while this one runs
        _check_out(args.out, args.force)  # again: another export may have finished meanwhile
        tmp = _temp_dir(args.out)
        try:
            save_weights(
                model, os.path.join(tmp, "model.safetensors"), {"source": cfg["source"], "data": data}, model_cfg=mcfg
            )
            atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(cfg, indent=2) + "\n")
            atomic_write_text(os.path.join(tmp, "load.py"), load_py(cfg))
            atomic_write_text(os.path.join(tmp, "README.md"), readme(cfg))
            _verify(tmp, model, cfg)
            _publish(tmp, args.out)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    uses = (
        '; timm alone loads it (timm.create_model("local-dir:FOLDER", pretrained=True))'
        if cfg["timm_loadable"]
        else f"; timm alone cannot load it ({'; '.join(cfg['needs'])}): load.py needs "
        "the installed lotus package (pip install -e . in a Lotus checkout)"
    )
    if data is None:
        uses += "; the weights record no mean/std or class names (see README.md)"
    print(f"exported {cfg['name']} from {path}: {sum(p.numel() for p in model.parameters())} parameters{uses}")
    for f in _FILES:
        print(f"wrote {os.path.join(args.out, f)}")
    print(f"load it: cd {args.out} && python load.py")
    return 0
