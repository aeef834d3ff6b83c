"""Evaluate a trained model: top-1 / top-5 accuracy, mean cross-entropy and per-class accuracy.

SOURCE is a run folder (its best.safetensors, or last with --which last), a `lotus export` folder or a
weights file. The images are either

  * the validation split of a config (--config; default: the run folder's config.yaml), built exactly as the
    run built it, so the numbers are the run's own evaluation, or
  * an ImageFolder (--data ROOT with ROOT/<class>/<image>), read with the preprocessing the weights record
    (mean/std, resize, crop); its class folders must be among the model's class names (when recorded).

examples:
  lotus validate runs/x                                   # the run's validation split
  lotus validate exported/ --data images/val --out val.json
  lotus validate runs/x --which last --config configs/digits.yaml
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="a run folder, a `lotus export` folder or a .safetensors file")
    p.add_argument("--which", choices=("best", "last"), help="run folder: best.safetensors (default) or last")
    p.add_argument(
        "--config",
        "-c",
        help="evaluate on this config's validation split (default: the run "
        "folder's config.yaml); also fills in what older weights do not record",
    )
    p.add_argument("--data", metavar="ROOT", help="evaluate on an ImageFolder instead (ROOT/<class>/<image>)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--out", "-o", metavar="FILE.json", help="also write the results (with per-class accuracy) here")


def _config_split(src, config: str | None):
    """(dataset, class names, description) of the config's validation split."""
    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.errors import LotusError
    from lotus.models import resolve_img_size

    path = config or src.config
    if path is None:
        raise LotusError(
            f"validate: {src.weights} has no config.yaml beside it; pass --config CONFIG.yaml (its "
            "validation split) or --data ROOT (an ImageFolder)"
        )
    cfg = load_config(path)
    bundle = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans, cfg.model, cfg.train.seed)
    return bundle.val, list(bundle.classes), f"{cfg.data.name} validation split of {path}"


def _folder(src, root: str):
    from lotus.errors import LotusError
    from lotus.inference import ImageFiles, folder_classes, require_data

    data = require_data(src, "--data")
    classes, pairs = folder_classes(root)
    names = [str(c) for c in data.get("classes") or []]
    if names:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise LotusError(
                f"--data: class folder {unknown[0]!r} in {root} is not one of the model's classes "
                f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
            )
        index = {c: names.index(c) for c in classes}
    else:
        names, index = classes, {c: i for i, c in enumerate(classes)}
    dataset = ImageFiles([f for f, _ in pairs], [index[c] for _, c in pairs], data)
    return dataset, names, f"ImageFolder {root}"


def run(args: argparse.Namespace) -> int:
    from lotus.errors import LotusError
    from lotus.evaluation import evaluate
    from lotus.inference import load_source, resolve_device

    if args.batch_size < 1:
        raise LotusError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise LotusError(f"--limit: expected an int >= 1, got {args.limit}")
    if args.config and args.data:
        raise LotusError("--data: evaluates an ImageFolder; --config names a config's split: pass one of them")
    src = load_source(args.source, args.which, args.config)
    dataset, names, what = _folder(src, args.data) if args.data else _config_split(src, args.config)
    classes = getattr(src.model, "num_classes", None) or len(names)
    if len(names) > classes:
        raise LotusError(f"validate: the data has {len(names)} classes, {src.name} predicts {classes}")
    device = resolve_device(args.device)
    out = evaluate(
        src.model.to(device), dataset, batch_size=args.batch_size, device=device, limit=args.limit, num_classes=classes
    )
    per_class = {
        str(names[i]) if i < len(names) else str(i): (hit / n if n else None)
        for i, (hit, n) in enumerate(zip(out["class_correct"], out["class_count"]))
    }
    result = {
        "source": src.weights,
        "data": what,
        "count": out["count"],
        "top1": out["val_acc"],
        "top5": out["val_acc5"],
        "loss": out["val_loss"],
        "per_class": per_class,
    }
    print(f"{src.name} ({src.weights}) on the {what}: {out['count']} images")
    print(f"top-1 {out['val_acc']:.4f}  top-5 {out['val_acc5']:.4f}  loss {out['val_loss']:.4f}")
    width = max(len(k) for k in per_class)
    for (k, acc), n in zip(per_class.items(), out["class_count"]):
        if n:
            print(f"  {k:<{width}}  {acc:.4f}  ({n} images)")
    if args.out:
        from lotus.safe_io import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
