"""What ``lotus export`` writes beside the weights: config.json (timm's local-dir layout), load.py, README.md.

config.json is what ``timm.create_model("local-dir:FOLDER", pretrained=True)`` reads: ``architecture`` (a timm
entry point: Lotus' own ``lotus_vit_*`` are exported as the plain ``vit_*_patch16_224`` VisionTransformer
they are, their sizes in ``model_args``), ``num_classes``, ``model_args``, ``pretrained_cfg`` (input size,
mean/std, interpolation, crop) and ``label_names``; Lotus' own fields (name, block, op, widths, thinned,
timm_loadable, needs, data) sit beside them and timm ignores them. OP blocks and thinned widths are not timm
architectures: then timm alone cannot load the folder and load.py needs the installed ``lotus`` package.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from typing import Any
from unittest import mock

__all__ = ["LOTUS_INSTALL", "config_json", "load_py", "readme", "export_data_metadata"]

# how to get the `lotus` package that load.py imports when timm alone cannot rebuild the model
LOTUS_INSTALL = (
    "the `lotus` package of the Lotus repository installed (`pip install -e .` in a Lotus checkout, "
    "or the wheel `python -m build` makes there; no package index has it)"
)
# build_model_with_cfg arguments that are not the model's own (dropped from the captured VisionTransformer kwargs)
_BUILDER_ONLY = {
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
    "pretrained_filter_fn",
    "feature_cfg",
    "pretrained_strict",
    "kwargs_filter",
    "model_cfg",
    "pretrained_model_args",
}
_NOT_PORTABLE = {
    "url",
    "hf_hub_id",
    "hf_hub_filename",
    "file",
    "source",
    "tag",
    "license",
    "state_dict",
    "custom_load",
    "architecture",
    "label_names",
    "label_descriptions",
}
# timm ViT entry points whose sizes model_args override; the one nearest in width is named
_VIT_NAMES = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
}


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
    import timm
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

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


def _timm_vit_name(args: dict) -> str:
    width = int(args.get("embed_dim", 768))
    return _VIT_NAMES[min(_VIT_NAMES, key=lambda w: (abs(w - width), w))]


def _pretrained_cfg(model: Any, section: dict, data: dict | None) -> dict:
    """timm's pretrained_cfg of the model (fields of timm's PretrainedCfg, no download source) with the
    exported input size and the run's normalisation and eval preprocessing."""
    from timm.models._pretrained import PretrainedCfg

    fields = {f.name for f in dataclasses.fields(PretrainedCfg)} - _NOT_PORTABLE
    out = {}
    for k, v in (getattr(model, "pretrained_cfg", None) or {}).items():
        if k not in fields:
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
    if data is not None:
        out.update({k: data[k] for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")})
    else:  # the model's defaults say nothing about how this run normalised its inputs
        out.pop("mean", None), out.pop("std", None)
    return out


def config_json(model: Any, mcfg: Any, default_widths: dict | None, source: str, data: dict | None) -> dict:
    """The export's config.json: timm's local-dir fields plus Lotus' model section (see the module docstring)."""
    import timm
    import torch

    from lotus.weights_meta import model_metadata

    section = model_metadata(mcfg, model)
    kw = _create_kwargs(section)
    vit_args = _registered_vit_args(section["name"], kw)
    thinned = section["widths"] is not None and section["widths"] != default_widths
    op = section["block"] == "op"
    module = timm.models.model_entrypoint(section["name"]).__module__
    lotus_only = vit_args is None and module.startswith("lotus.")
    needs = [
        what
        for what, on in (
            ("lotus.models.op_block (Outlier-Protected blocks are not a timm block)", op),
            ("pruning.apply_widths (thinned, non-uniform block widths)", thinned),
            (f"the lotus module that registers {section['name']}", lotus_only),
        )
        if on
    ]
    cfg = {k: v for k, v in section.items() if k != "timm_version"}
    cfg.update(
        architecture=_timm_vit_name(vit_args) if vit_args is not None else section["name"],
        num_classes=section["num_classes"],
        num_features=getattr(model, "num_features", None),
        global_pool=getattr(model, "global_pool", None)
        if isinstance(getattr(model, "global_pool", None), str)
        else None,
        model_args=vit_args if vit_args is not None else kw,
        pretrained_cfg=_pretrained_cfg(model, section, data),
        thinned=thinned,
        timm_loadable=not needs,
        needs=needs,
        registers=module if lotus_only else None,
    )
    if data is not None:
        cfg["label_names"] = list(data["classes"])
        cfg["data"] = data
    if op:
        cfg["depth"] = len(model.blocks)
    cfg["source"] = os.path.abspath(source)
    cfg["versions"] = {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]}
    if not needs:
        cfg["note"] = (
            f'timm alone loads it: timm.create_model("local-dir:FOLDER", pretrained=True) builds '
            f"{cfg['architecture']} with model_args (the sizes of {section['name']}); "
            "timm.data.resolve_data_config(model=model) gives the run's preprocessing"
        )
    else:
        cfg["note"] = f"timm alone cannot load it (needs {'; '.join(needs)}): use load.py, with {LOTUS_INSTALL}"
    if data is None:
        cfg["note"] += (
            "; the weights record no normalisation (mean/std) or class names, so pretrained_cfg "
            "has neither: feed inputs normalised as in training"
        )
    return cfg


def load_py(cfg: dict) -> str:
    """The loader: timm's local-dir loader, or timm + Lotus' OP block / pruning.apply_widths when it needs them."""
    if cfg["timm_loadable"]:
        imports, body = ["import timm"], ['    model = timm.create_model("local-dir:" + HERE, pretrained=True)']
        needs_text = (
            "Needs torch, timm and safetensors only: this is timm's own local-dir layout, so "
            'timm.create_model("local-dir:FOLDER", pretrained=True) loads it anywhere.'
        )
    else:
        imports, steps = ["import timm"], []
        if cfg["block"] == "op":
            imports.append("from lotus.models.op_block import OPConfig, op_model_kwargs  # the installed lotus package")
            steps.append('    kwargs.update(op_model_kwargs(OPConfig(**cfg["op"]), cfg["depth"]))  # OP blocks')
        if cfg.get("registers"):
            imports.append(
                f"import {cfg['registers']}  # registers {cfg['name']} with timm (the installed lotus package)"
            )
        steps.append('    model = timm.create_model(cfg["architecture"], pretrained=False, **kwargs)')
        if cfg["thinned"]:
            imports.append("from pruning import apply_widths  # the installed lotus package")
            steps.append('    apply_widths(model, cfg["widths"])  # the thinned heads / MLP widths of each block')
        body = [
            '    with open(os.path.join(HERE, "config.json")) as f:',
            "        cfg = json.load(f)",
            '    kwargs = dict(cfg["model_args"])',
            *steps,
            '    model.load_state_dict(load_file(os.path.join(HERE, "model.safetensors")))',
        ]
        needs_text = f"Needs torch, timm and safetensors, plus {'; '.join(cfg['needs'])}: {LOTUS_INSTALL}."
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
{chr(10).join(body)}
    return model.to(device).eval()


if __name__ == "__main__":
    model = load_model()
    size = json.load(open(os.path.join(HERE, "config.json")))["pretrained_cfg"]["input_size"]
    with torch.no_grad():
        out = model(torch.zeros(1, *size))
    print(f"{{sum(p.numel() for p in model.parameters())}} parameters; input {{tuple(size)}} -> {{tuple(out.shape)}}")
'''


def readme(cfg: dict) -> str:
    """README.md of the export: what loads it, how to preprocess, what it needs."""
    p = cfg["pretrained_cfg"]
    chans = p.get("input_size", [3])[0]
    if cfg["timm_loadable"]:
        load = ["import timm", 'model = timm.create_model("local-dir:FOLDER", pretrained=True).eval()']
        how = (
            f"timm alone loads it ({cfg['architecture']} with the sizes in config.json's model_args); "
            "`python load.py` does the same."
        )
    else:
        load = ["import sys; sys.path.insert(0, 'FOLDER')", "from load import load_model", "model = load_model()"]
        how = (
            f"**timm alone cannot load it**: {'; '.join(cfg['needs'])}. `load.py` rebuilds it; it needs "
            f"{LOTUS_INSTALL}."
        )
    norm = (
        f"mean {p['mean']}, std {p['std']}, {p.get('interpolation')} resize, crop_pct {p.get('crop_pct')} "
        f"({p.get('crop_mode')})"
        if "mean" in p
        else "unknown (the weights record none): normalise as in training"
    )
    classes = cfg.get("label_names")
    lines = [
        f"# {cfg['name']} exported by `lotus export`",
        "",
        how,
        "",
        f"- input: {chans} channel(s), {p.get('input_size')}; {norm}",
        f"- classes ({cfg['num_classes']}): {', '.join(map(str, classes)) if classes else 'not recorded'}",
        f"- source: {cfg['source']}",
        "",
        "```python",
        *load,
        "from PIL import Image",
        "from timm.data import create_transform, resolve_data_config",
        "transform = create_transform(**resolve_data_config(model=model))"
        if cfg["timm_loadable"]
        else f"transform = create_transform(**resolve_data_config(pretrained_cfg={json.dumps(p)}))",
        f"x = transform(Image.open('image.png').convert('{'L' if chans == 1 else 'RGB'}'))[None]",
        "probs = model(x).softmax(-1)",
        "```",
        "",
        "Or with Lotus: `lotus predict FOLDER IMAGES...`, `lotus validate FOLDER --data DIR`.",
        "",
    ]
    return "\n".join(lines)


def export_data_metadata(path: str, config: str | None) -> dict | None:
    """The weights' ``"data"`` metadata; for files that record none, read off the training config's data
    (``config``, or the config.yaml beside the weights) when it can be loaded here, else None."""
    from lotus.data_meta import data_metadata, read_data_metadata
    from lotus.errors import LotusError

    data = read_data_metadata(path, "export")
    if data is not None:
        return data
    config = config or os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    if not os.path.isfile(config):
        return None
    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.models import resolve_img_size

    try:
        cfg = load_config(config)
        bundle = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans, cfg.model, cfg.train.seed)
    except LotusError:
        return None
    return data_metadata(bundle, cfg.data, cfg.model)
