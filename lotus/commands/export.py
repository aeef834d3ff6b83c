"""Export a run's weights for use without Lotus' training code: plain timm weights, their config, a loader.

From a run directory (its best.safetensors, or last.safetensors with --which last) or a weights file, writes
into --out:

  model.safetensors  the plain timm state dict: masks folded into the weights, thinned shapes kept
  config.json        the model section (name, img_size, patch_size, in_chans, num_classes, kwargs, block, op,
                     widths) plus the timm arguments that rebuild it (timm's own local-dir layout)
  load.py            the few lines of Python that rebuild the model with timm and load the weights; thinned
                     blocks add pruning.apply_widths, OP blocks lotus.models.op_block (`pip install lotus-vit`)

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
import textwrap
from typing import Any
from unittest import mock

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lotus.checkpoint import (
    atomic_write_text,
    load_weights,
    model_config_from_checkpoint,
    model_metadata,
    read_model_metadata,
    save_weights,
)
from lotus.commands.prune_inputs import checkpoint_shapes
from lotus.config import ModelConfig, load_config
from lotus.errors import LotusError
from lotus.models import create_model, resolve_img_size

__all__ = ["add_arguments", "run"]

_FILES = ("model.safetensors", "config.json", "load.py")
# build_model_with_cfg arguments that are not the model's own (dropped from the captured VisionTransformer kwargs)
_BUILDER_ONLY = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_filter_fn", "feature_cfg",
                 "pretrained_strict", "kwargs_filter", "model_cfg", "pretrained_model_args"}
_NOT_PORTABLE = {"url", "hf_hub_id", "hf_hub_filename", "file", "source", "tag", "mean", "std", "license"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR|FILE", help="a run directory or a .safetensors/state-dict file")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--which", choices=("best", "last"), help="run directory: best.safetensors (default) or last")
    p.add_argument("--config", "-c", help="the training config, for files that record no model section "
                   "(default: the config.yaml next to the weights)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (replacing its export files)")


# ------------------------------------------------------------------------------------------- inputs
def _weights_file(source: str, which: str | None) -> str:
    if os.path.isdir(source):
        path = os.path.join(source, f"{which or 'best'}.safetensors")
        if not os.path.isfile(path):
            other = "last" if (which or "best") == "best" else "best"
            hint = f"; pass --which {other}" if os.path.isfile(os.path.join(source, f"{other}.safetensors")) else \
                " (is it a run directory?)"
            raise LotusError(f"export: {source} has no {os.path.basename(path)}{hint}")
        return path
    if not os.path.isfile(source):
        raise LotusError(f"export: no such run directory or file: {source}")
    if which:
        raise LotusError(f"--which: only for a run directory; {source} is a file")
    return source


def _check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise LotusError(f"--out: {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise LotusError(f"--out: {out} is not empty (holds {min(os.listdir(out))}); pass --force to write "
                         "into it or choose another --out")


def _model_config(path: str, config: str | None) -> ModelConfig:
    """The recorded model section; a config (--config, or the run's config.yaml) fills in what it lacks."""
    section = read_model_metadata(path, "export")
    complete = bool(section) and "img_size" in section
    if config is None and not complete:
        run_cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
        config = run_cfg if os.path.isfile(run_cfg) else None
    if config is None and not section:
        raise LotusError(f"export: {path} records no model section (not written by Lotus, or by an older version) "
                         "and has no config.yaml beside it; pass --config FILE")
    if config is not None:
        cfg = load_config(config)
        base, given = cfg.model, dict(cfg.source.get("model") or {})
    else:
        base, given = ModelConfig(), {}
    mcfg = model_config_from_checkpoint(base, path, given, "export")
    return dataclasses.replace(mcfg, checkpoint=None, pretrained=False, drop_path_rate=0.0)


def _lotus_model(path: str, mcfg: ModelConfig) -> tuple[nn.Module, ModelConfig, dict | None]:
    """(model with the file's weights, its config with sizes filled in, its widths before loading)."""
    classes, chans = checkpoint_shapes(path, mcfg.name)
    mcfg = dataclasses.replace(mcfg, num_classes=mcfg.num_classes or classes, in_chans=mcfg.in_chans or chans)
    model = create_model(mcfg, mcfg.num_classes or 1000, mcfg.in_chans or 3, resolve_img_size(mcfg))
    default_widths = model_metadata(None, model)["widths"]
    load_weights(model, path, key="export")
    return model.eval(), mcfg, default_widths


# ------------------------------------------------------------------------------------------- recipe
def _create_kwargs(section: dict) -> dict:
    """What ``timm.create_model(name, **kw)`` needs to rebuild the architecture (JSON values only)."""
    kw = {"num_classes": section["num_classes"], "in_chans": section["in_chans"], "img_size": section["img_size"]}
    if section.get("patch_size") is not None:
        kw["patch_size"] = section["patch_size"]
    kw.update(section.get("kwargs") or {})
    return {k: v for k, v in kw.items() if v is not None}


def _registered_vit_args(name: str, kwargs: dict) -> dict | None:
    """The ``VisionTransformer`` kwargs behind a model Lotus registers with timm (so timm alone builds it).

    The entry point is called with its builder replaced by a recorder: the kwargs come from the registered
    function itself, never from a copy of its defaults. None when it is not a plain ViT built that way."""
    fn = timm.models.model_entrypoint(name)
    module = sys.modules.get(fn.__module__)
    if not fn.__module__.startswith("lotus.") or not hasattr(module, "build_model_with_cfg"):
        return None
    seen: dict = {}

    def record(cls: Any, variant: str, pretrained: bool = False, **kw: Any) -> nn.Module:
        seen.update(cls=cls, kw=kw)
        return nn.Identity()

    with mock.patch.object(module, "build_model_with_cfg", record):
        fn(pretrained=False, **kwargs)
    if seen.get("cls") is not VisionTransformer:
        return None
    args = {k: v for k, v in seen["kw"].items() if k not in _BUILDER_ONLY}
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        return None
    return args


def _pretrained_cfg(model: nn.Module, section: dict) -> dict:
    """timm's pretrained_cfg of the model without download/normalisation fields, with the exported input size."""
    out = {}
    for k, v in (getattr(model, "pretrained_cfg", None) or {}).items():
        if k in _NOT_PORTABLE:
            continue
        try:
            out[k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            continue
    size = section["img_size"]
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        out["input_size"] = [section["in_chans"], h, w]
    out["num_classes"] = section["num_classes"]
    return out


def _config_json(model: nn.Module, mcfg: ModelConfig, default_widths: dict | None, source: str) -> dict:
    section = model_metadata(mcfg, model)
    kw = _create_kwargs(section)
    vit_args = _registered_vit_args(section["name"], kw)
    thinned = section["widths"] is not None and section["widths"] != default_widths
    cfg = {k: v for k, v in section.items() if k != "timm_version"}
    cfg.update(thinned=thinned, architecture=section["name"], model_args=vit_args if vit_args is not None else kw,
               build="VisionTransformer" if vit_args is not None else "timm.create_model",
               pretrained_cfg=_pretrained_cfg(model, section))
    if section["block"] == "op":
        cfg["depth"] = len(model.blocks)
    cfg["source"] = os.path.abspath(source)
    cfg["versions"] = {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]}
    cfg["note"] = ("inputs as in training: Lotus normalises with the training split's per-channel mean/std "
                   "(imagefolder: 0.5/0.5), so pretrained_cfg lists no mean/std")
    return cfg


def _load_py(cfg: dict) -> str:
    """The loader: timm (+ pruning.apply_widths when thinned, + Lotus' OP block when block is op)."""
    needs, imports, steps = [], [], []
    if cfg["build"] == "VisionTransformer":
        imports.append("from timm.models.vision_transformer import VisionTransformer")
        build = 'VisionTransformer(**kwargs)'
    else:
        imports.append("import timm")
        module = timm.models.model_entrypoint(cfg["architecture"]).__module__
        if module.startswith("lotus."):
            imports.append(f"import {module}  # registers {cfg['architecture']} with timm (pip install lotus-vit)")
            needs.append(f"{module} (registers the model with timm)")
        build = 'timm.create_model(cfg["architecture"], pretrained=False, **kwargs)'
    if cfg["block"] == "op":
        imports.append("from lotus.models.op_block import OPConfig, op_model_kwargs  # pip install lotus-vit")
        steps.append('    kwargs.update(op_model_kwargs(OPConfig(**cfg["op"]), cfg["depth"]))  # OP blocks')
        needs.append("lotus.models.op_block (the Outlier-Protected block)")
    steps.append(f"    model = {build}")
    if cfg["thinned"]:
        imports.append("from pruning import apply_widths  # pip install lotus-vit")
        steps.append('    apply_widths(model, cfg["widths"])  # the thinned heads / MLP widths of each block')
        needs.append("pruning.apply_widths (the thinned block widths)")
    needs_text = "Needs torch, timm and safetensors" + (
        ", plus " + "; ".join(needs) + " from `pip install lotus-vit`." if needs else " only.")
    if not needs and cfg["build"] == "timm.create_model":  # timm's own local-dir layout holds too
        needs_text += ' timm alone also loads it: timm.create_model("local-dir:FOLDER", pretrained=True).'
    needs_text = textwrap.fill(needs_text, 100)
    return f'''"""Rebuild {cfg["name"]} exported by `lotus export`, and load its weights.

{needs_text}

    python load.py                  # build, load, run one forward pass
    from load import load_model     # from this folder (or with it on sys.path)
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
{chr(10).join(imports)}

HERE = os.path.dirname(os.path.abspath(__file__))


def load_model(device: str = "cpu") -> torch.nn.Module:
    with open(os.path.join(HERE, "config.json")) as f:
        cfg = json.load(f)
    kwargs = dict(cfg["model_args"])
{chr(10).join(steps)}
    model.load_state_dict(load_file(os.path.join(HERE, "model.safetensors")))
    return model.to(device).eval()


if __name__ == "__main__":
    model = load_model()
    size = json.load(open(os.path.join(HERE, "config.json")))["pretrained_cfg"]["input_size"]
    with torch.no_grad():
        out = model(torch.zeros(1, *size))
    print(f"{{sum(p.numel() for p in model.parameters())}} parameters; input {{tuple(size)}} -> {{tuple(out.shape)}}")
'''


# ------------------------------------------------------------------------------------------- check + write
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _verify(folder: str, model: nn.Module, cfg: dict) -> None:
    """Run the written load.py in this process; its model must give the Lotus model's logits."""
    name = f"_lotus_export_check_{os.getpid()}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "load.py"))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        rebuilt = module.load_model()
    except Exception as e:  # noqa: BLE001 - a loader that cannot run is a failed export
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LotusError(f"export: the generated load.py cannot rebuild {cfg['name']} ({first}); "
                         "nothing written") from None
    finally:
        sys.modules.pop(name, None)
    x = torch.randn(2, *cfg["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(0))
    want, got = _logits(model, x), _logits(rebuilt, x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        diff = (want - got).abs().max().item() if want.shape == got.shape else f"shape {tuple(got.shape)}"
        raise LotusError(f"export: the generated load.py rebuilds {cfg['name']} with other logits ({diff}); "
                         "nothing written")


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
    path = _weights_file(args.source, args.which)
    _check_out(args.out, args.force)
    if args.config and not os.path.isfile(args.config):
        raise LotusError(f"--config: config file not found: {args.config}")
    model, mcfg, default_widths = _lotus_model(path, _model_config(path, args.config))
    cfg = _config_json(model, mcfg, default_widths, path)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        save_weights(model, os.path.join(tmp, "model.safetensors"), {"source": cfg["source"]}, model_cfg=mcfg)
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(cfg, indent=2) + "\n")
        atomic_write_text(os.path.join(tmp, "load.py"), _load_py(cfg))
        _verify(tmp, model, cfg)
        _publish(tmp, args.out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    extra = [w for w, on in (("pruning.apply_widths (thinned widths)", cfg["thinned"]),
                             ("lotus.models.op_block (OP blocks)", cfg["block"] == "op")) if on]
    uses = f"; load.py also uses {' and '.join(extra)} (pip install lotus-vit)" if extra else "; timm alone loads it"
    print(f"exported {cfg['name']} from {path}: {sum(p.numel() for p in model.parameters())} parameters{uses}")
    for f in _FILES:
        print(f"wrote {os.path.join(args.out, f)}")
    print(f"load it: cd {args.out} && python load.py")
    return 0
