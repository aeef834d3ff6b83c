"""Prune a timm model (magnitude, Wanda, Taylor, N:M / 2:4, structured heads+neurons) or sweep its essential sparsity.

--method is any method of the pruning registry (pruning.registry): the flags fill the fields of its config, and
what it needs (calibration data, which scopes) is read from there.

Writes the pruned weights (safetensors; thinned block widths in the metadata, so `lotus` reloads them) and a
report (report.json + report.md): params, nonzeros, FLOPs (torch.utils.flop_counter), per-layer sparsity or
per-block widths, latency before/after measured on this device, and val accuracy before/after when data is
given (--config or --calib). --finetune-epochs N then recovers accuracy: the pruned model is fine-tuned on the
data of --config/--calib (optionally distilled from the unpruned model, --distill), and the report gives the
accuracy before pruning, after pruning and after recovery (see lotus/commands/prune_recover.py).

examples:
  lotus prune --model vit_small_patch16_224 --checkpoint weights.safetensors --method structured \\
              --heads 0.25 --mlp 0.5 --calib configs/digits.yaml --out pruned/
  lotus prune --model vit_base_patch16_224 --pretrained --method 2:4 --score wanda --calib configs/digits.yaml \\
              --out pruned/
  lotus prune --config configs/digits.yaml --checkpoint runs/x/best.safetensors --method magnitude --sparsity 0.6
  lotus prune --config configs/digits.yaml --checkpoint runs/x/best.safetensors --sweep magnitude --out sweep/
  lotus prune --checkpoint runs/x/best.safetensors --method structured --heads 0.25 --out pruned/
  lotus prune --config configs/digits.yaml --checkpoint runs/x/best.safetensors --method structured \\
              --heads 0.25 --mlp 0.5 --finetune-epochs 5 --distill --out pruned/

--model builds a timm model by name (--calib then supplies data only); --config takes model and data from a
training config. A --checkpoint written by Lotus records its model section (name, sizes, kwargs, block), which
is the default for every model setting that --model/--config/--img-size/--num-classes do not give. On CPU, 2:4
has no sparse kernels: masked dense weights are used and the report says so (and claims no speed-up).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from typing import TYPE_CHECKING

import pruning
from lotus.commands import prune_recover, prune_report
from lotus.errors import LotusError, library_error
from lotus.run_files import checkpoint_file
from pruning.registry import config_for, field_choices, method_named, method_names, methods, needs_calibration

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs
    import torch
    from torch import nn

__all__ = ["add_arguments", "run"]

# library field -> flag, for the pruning library's "field: reason" errors
_FLAGS = {
    "sparsity": "--sparsity",
    "scope": "--scope",
    "n": "--n",
    "m": "--m",
    "score": "--score",
    "heads": "--heads",
    "mlp": "--mlp",
    "importance": "--importance",
    "round_to": "--round-to",
    "calib_loader": "--calib",
    "min_heads": "--heads",
    "min_mlp": "--mlp",
}
_OUTPUTS = (
    "model.safetensors",
    "report.json",
    "report.md",
    "sweep.json",
    "sweep.png",
    "sweep.md",
    "pruned.safetensors",
    "teacher.safetensors",
    "finetune",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model")
    src.add_argument("--model", "-m", help="timm model name (e.g. vit_small_patch16_224)")
    src.add_argument("--config", "-c", help="training config: model and data sections (instead of --model)")
    src.add_argument(
        "--checkpoint",
        help="weights to prune: a run folder (its best.safetensors), .safetensors or a "
        "torch state dict (weights_only); "
        "a Lotus file also gives the model (no --model/--config needed)",
    )
    src.add_argument(
        "--pretrained", action="store_true", help="timm pretrained weights (downloads; offline: use --checkpoint)"
    )
    src.add_argument("--num-classes", type=int, help="classifier size (default: from --checkpoint, the data, or timm)")
    src.add_argument("--img-size", type=int, help="input size (default: the config's or the timm model's)")
    src.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of --config/--calib (repeatable)",
    )
    how = p.add_argument_group("pruning")
    how.add_argument(
        "--method",
        choices=method_names(),
        help="what to prune: " + "; ".join(f"{m.name}: {m.description}" for m in methods()),
    )
    how.add_argument(
        "--sparsity", type=float, default=0.5, help="unstructured methods: fraction of weights removed, in [0, 1)"
    )
    how.add_argument("--scope", choices=_scopes(), help="where weights compete; " + _scope_help())
    how.add_argument(
        "--score", choices=field_choices("nm", "score"), default="magnitude", help="N:M / 2:4 group scoring"
    )
    how.add_argument("--n", type=int, default=2, help="N of N:M (method nm)")
    how.add_argument("--m", type=int, default=4, help="M of N:M (method nm)")
    how.add_argument("--heads", type=float, default=0.0, help="structured: fraction of attention heads removed")
    how.add_argument("--mlp", type=float, default=0.0, help="structured: fraction of MLP hidden neurons removed")
    how.add_argument(
        "--importance",
        choices=field_choices("structured", "importance"),
        default="magnitude",
        help="structured: head/neuron importance",
    )
    how.add_argument("--round-to", type=int, default=1, help="structured: kept widths are multiples of this")
    how.add_argument("--include-head", action="store_true", help="also prune the classifier head")
    how.add_argument("--include-patch-embed", action="store_true", help="also prune the patch embedding")
    how.add_argument("--calib", help="config whose data section supplies calibration/validation batches")
    how.add_argument("--calib-batches", type=int, default=8, help="calibration batches (wanda, taylor, activation)")
    sweep = p.add_argument_group("essential-sparsity sweep")
    sweep.add_argument("--sweep", choices=("magnitude",), help="sweep one-shot magnitude sparsity instead of pruning")
    sweep.add_argument("--sweep-step", type=float, default=0.1, help="sparsity step of the sweep")
    sweep.add_argument("--max-sparsity", type=float, default=0.9, help="largest swept sparsity")
    sweep.add_argument("--tolerance", type=float, default=0.01, help="knee: allowed accuracy drop (0.01 = 1 point)")
    run_ = p.add_argument_group("run")
    run_.add_argument("--out", "-o", default="pruned", help="output folder (default: pruned/)")
    run_.add_argument("--force", action="store_true", help="overwrite earlier results in --out")
    run_.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run_.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="auto: bfloat16 for 2:4 on CUDA (the kernels need it), else float32",
    )
    run_.add_argument("--batch-size", type=int, default=32, help="latency batch size")
    run_.add_argument("--latency-iters", type=int, default=10, help="timed forward passes (0: skip latency)")
    run_.add_argument("--max-eval", type=int, help="evaluate on at most this many validation images")
    prune_recover.add_arguments(p)


def _scopes() -> tuple[str, ...]:
    """Every ``scope`` a registered method accepts."""
    return tuple(dict.fromkeys(s for m in methods() for s in field_choices(m.config, "scope")))


def _scope_help() -> str:
    """``magnitude: layer (default) | global; ...`` for the methods that have a scope."""
    parts = []
    for m in methods():
        choices = field_choices(m.config, "scope")
        if choices:
            default = next(f.default for f in dataclasses.fields(m.config) if f.name == "scope")
            parts.append(f"{m.name}: " + " | ".join(f"{c} (default)" if c == default else c for c in choices))
    return "; ".join(parts)


def _library_config(args: argparse.Namespace) -> object:
    """The pruning config of ``--method``, its fields filled from the flags of the same name."""
    flags = ("sparsity", "scope", "n", "m", "score", "heads", "mlp", "importance", "round_to")
    try:  # a flag the config has no field for is ignored; --scope not given: the method's default
        return config_for(args.method, kernels="off", **{f: getattr(args, f) for f in flags})
    except ValueError as e:
        raise library_error(e, _FLAGS, f"--method {args.method}") from None


# ------------------------------------------------------------------------------------------- validation
def _check_args(args: argparse.Namespace) -> None:
    import torch

    if args.model and args.config:
        raise LotusError("prune: pass --model NAME or --config FILE, not both (--calib adds data to --model)")
    if not args.model and not args.config and not args.checkpoint:
        raise LotusError(
            "prune: pass --model NAME (a timm model), --config FILE, or a --checkpoint written by Lotus "
            "(it records its model)"
        )
    if args.checkpoint and args.pretrained:
        raise LotusError("prune: pass --checkpoint FILE or --pretrained, not both")
    if args.checkpoint:
        args.checkpoint = checkpoint_file(args.checkpoint)  # a run folder: its best (else last) weights
    for flag in ("config", "calib"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise LotusError(f"--{flag}: config file not found: {path}")
    if bool(args.sweep) == bool(args.method):
        raise LotusError("prune: pass --method METHOD to prune, or --sweep magnitude to sweep sparsity")
    if not 0.0 <= args.sparsity < 1.0:
        raise LotusError(f"--sparsity: expected a number in [0, 1), got {args.sparsity:g}")
    for flag in ("heads", "mlp"):
        v = getattr(args, flag)
        if not 0.0 <= v < 1.0:
            what = "every attention head" if flag == "heads" else "every MLP neuron"
            extra = f" ({v:g} would remove {what})" if v >= 1.0 else ""
            raise LotusError(f"--{flag}: expected a fraction in [0, 1){extra}, got {v:g}")
    structured = bool(args.method) and method_named(args.method).structured
    if structured and args.heads == 0 and args.mlp == 0:
        raise LotusError(f"--method {args.method}: pass --heads and/or --mlp (fractions to remove)")
    if args.method and not structured and (args.heads or args.mlp):
        raise LotusError(f"--heads/--mlp: only used with --method structured, got --method {args.method}")
    if args.method == "nm" and not 1 <= args.n < args.m:
        raise LotusError(f"--n/--m: expected 1 <= n < m, got {args.n}:{args.m}")
    scopes = field_choices(args.method or "magnitude", "scope")
    if args.scope and args.scope not in scopes:
        raise LotusError(f"--scope: {args.scope!r} does not apply to --method {args.method or 'sweep'}")
    if args.method:
        _library_config(args)  # the config's own checks, before any model is built
    if args.sweep and not (0 < args.sweep_step < 1):
        raise LotusError(f"--sweep-step: expected a number in (0, 1), got {args.sweep_step:g}")
    if args.sweep and not (0 <= args.max_sparsity < 1):
        raise LotusError(f"--max-sparsity: expected a number in [0, 1), got {args.max_sparsity:g}")
    if args.tolerance < 0:
        raise LotusError(f"--tolerance: expected a number >= 0, got {args.tolerance:g}")
    for flag in ("calib_batches", "batch_size"):
        if getattr(args, flag) < 1:
            raise LotusError(f"--{flag.replace('_', '-')}: expected an int >= 1, got {getattr(args, flag)}")
    if args.latency_iters < 0:
        raise LotusError(f"--latency-iters: expected an int >= 0, got {args.latency_iters}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LotusError("--device: cuda requested but no CUDA device is available")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise LotusError(f"--out: {args.out} exists and is not a folder")
    prune_recover.check_args(args)
    taken = [f for f in _OUTPUTS if os.path.exists(os.path.join(args.out, f))]
    if taken and not args.force:
        raise LotusError(
            f"--out: {args.out} already holds {taken[0]}; pass --force to overwrite or choose another --out"
        )


# ------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from lotus.safe_io import output_lock, refuse_symlink

    refuse_symlink(args.out, "--out")
    with output_lock(args.out, "--out"):  # a second prune into this --out is refused while this one runs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    from lotus.commands.prune_inputs import accuracy, build, calib, input_size, load_data_config, stats
    from lotus.data_meta import carried_data_metadata
    from lotus.weights import save_weights
    from pruning.masks import masks_state

    _check_args(args)
    data_cfg = load_data_config(args)
    needs_data = args.sweep or needs_calibration(_library_config(args))
    if needs_data and data_cfg is None:
        what = "the sweep evaluates on validation data" if args.sweep else "this method needs calibration data"
        raise LotusError(f"--calib: {what}; pass --calib CONFIG.yaml (or --config)")
    model, mcfg, bundle = build(args, data_cfg)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" and args.method == "2:4" else "float32"
    dtype = getattr(torch, dtype_name)
    model = model.to(device=device, dtype=dtype).eval()
    classes_ok = bundle is not None and getattr(model, "num_classes", None) == bundle.num_classes
    os.makedirs(args.out, exist_ok=True)

    if args.sweep:
        return prune_report.run_sweep(args, model, mcfg.name, bundle, device, dtype, classes_ok)

    example = torch.randn(args.batch_size, *input_size(model, bundle), generator=torch.Generator().manual_seed(0))
    example = example.to(device=device, dtype=dtype)
    notes: list[str] = []
    before = stats(model, example)
    if classes_ok:
        before["val_acc"] = accuracy(model, bundle, device, dtype, args.max_eval)
    elif bundle is not None:
        notes.append(
            f"val accuracy skipped: the model has {getattr(model, 'num_classes', '?')} classes, "
            f"the data {bundle.num_classes}"
        )
    finetune = args.finetune_epochs > 0
    if finetune and not classes_ok:
        raise LotusError(
            f"--finetune-epochs: the model predicts {getattr(model, 'num_classes', '?')} classes, the "
            f"data has {bundle.num_classes}; recovery fine-tunes a model trained on this data"
        )
    meta = {"method": args.method, "source": args.checkpoint or ("pretrained" if args.pretrained else "random init")}
    meta["data"] = carried_data_metadata(args.checkpoint, bundle, data_cfg)  # mean/std, classes (None: unknown)
    teacher_path = os.path.join(args.out, "teacher.safetensors") if args.distill else None
    if teacher_path:  # the unpruned model, as the fine-tune's teacher
        save_weights(
            model.float() if dtype != torch.float32 else model,
            teacher_path,
            {**meta, "method": "none", "teacher": True},
            model_cfg=mcfg,
        )
        model.to(dtype=dtype)
    calib_data = calib(bundle, args.calib_batches, data_cfg.data.batch_size if data_cfg else 32)
    dense = copy.deepcopy(model) if args.latency_iters > 0 else None  # timed side by side with the result
    report = _prune(args, model, calib_data)
    notes += report.get("notes", [])
    masks = None
    structured = method_named(args.method).structured
    if not structured:
        masks = masks_state(model) if finetune else None  # what the fine-tune must keep
        pruning.make_permanent(model)
    weights_path = os.path.join(args.out, "pruned.safetensors" if finetune else "model.safetensors")
    save_weights(model.float() if dtype != torch.float32 else model, weights_path, meta, model_cfg=mcfg)
    model.to(dtype=dtype)
    after = stats(model, example)  # counted before 2:4 conversion: FlopCounterMode cannot trace sparse tensors
    if args.method == "2:4":
        report["kernels"] = _convert_kernels(model, report, example)
        if report["kernels"].get("note") and report["kernels"]["note"] not in notes:
            notes.append(report["kernels"]["note"])
    if classes_ok:
        after["val_acc"] = accuracy(model, bundle, device, dtype, args.max_eval)
    if dense is not None:
        from pruning.report import compare_latency

        lat = compare_latency(
            {"before": dense, "after": model},
            example,
            warmup=2,
            iters=args.latency_iters,
            rounds=min(args.latency_iters, 5),
        )
        before["latency"], after["latency"] = lat["before"], lat["after"]
        del dense
    sparse_kernel = structured or bool(report.get("kernels", {}).get("converted"))
    if not sparse_kernel:
        notes.append(
            "no sparse kernel on this device: the zeros of the masks run on dense kernels, so no speed-up "
            "is reported (effective_flops is what a sparse kernel could skip)"
        )
    full = {
        "model_name": mcfg.name,
        "method": args.method,
        "device": prune_report.device_name(device),
        "dtype": dtype_name,
        "before": before,
        "after": after,
        "notes": notes,
        "files": {"weights": weights_path},
    }
    for k, v in report.items():
        if k not in ("notes", "kept_indices", "method"):
            full["model_sparsity" if k == "model" else k] = v
    if before.get("latency") and after.get("latency") and sparse_kernel:
        from pruning.report import speedup_per_round

        sp = speedup_per_round(before["latency"], after["latency"])
        full["speedup"], full["speedup_range"], full["latency_rounds"] = (
            sp["median"],
            [sp["min"], sp["max"]],
            sp["rounds"],
        )
    if finetune:
        del model
        rec = prune_recover.recover(args, data_cfg, mcfg, bundle, device, dtype, weights_path, teacher_path, masks)
        full["recovery"] = rec
        full["accuracy"] = {
            "before_pruning": before.get("val_acc"),
            "after_pruning": after.get("val_acc"),
            "after_recovery": rec["val_acc"],
        }
        full["files"] = {
            "weights": os.path.join(args.out, "model.safetensors"),
            "pruned": weights_path,
            **({"teacher": teacher_path} if teacher_path else {}),
            "finetune_dir": rec["run_dir"],
        }
    return prune_report.write_report(args, full)


def _prune(args: argparse.Namespace, model: nn.Module, calib: list | None) -> dict:
    """Prune ``model`` in place as the flags say; library errors name the flag."""
    try:
        return _prune_with_library(args, model, calib)
    except ValueError as e:
        raise library_error(e, _FLAGS, f"--method {args.method}") from None


def _prune_with_library(args: argparse.Namespace, model: nn.Module, calib: list | None) -> dict:
    from lotus.features.pruning.checks import check_nm_shapes
    from pruning.masks import make_filter

    cfg = _library_config(args)
    if method_named(args.method).structured:
        return pruning.prune_(model, cfg, calib_loader=calib)
    keep = make_filter(model, include_head=args.include_head, include_patch_embed=args.include_patch_embed)
    if isinstance(cfg, pruning.SemiStructuredConfig):
        what = "--method 2:4" if args.method == "2:4" else f"--method nm with --m {cfg.m}"
        check_nm_shapes(model, keep, cfg.m, what)
    return pruning.prune_(model, cfg, calib_loader=calib, filter_fn=keep)


def _convert_kernels(model: nn.Module, report: dict, example: torch.Tensor) -> dict:
    """2:4 masked layers -> torch.sparse semi-structured kernels where legal and faster (CUDA only)."""

    masked = {k for k, v in report.get("layers", {}).items() if v.get("masked")}
    tokens = example.shape[0] * _tokens(model, example)
    return pruning.to_semi_structured_(model, filter_fn=lambda m, f: f in masked, probe_tokens=tokens)


def _tokens(model: nn.Module, example: torch.Tensor) -> int:
    pe = getattr(model, "patch_embed", None)
    n = getattr(pe, "num_patches", None) or 1
    return int(n) + int(getattr(model, "num_prefix_tokens", 0) or 0)
