"""Predict the classes of image files: the top-k labels and their probabilities, as CSV or JSON.

SOURCE is a run folder (best.safetensors, or last with --which last), a `lotus export` folder or a weights
file. Each image is converted to the model's channels (L or RGB), resized, cropped and normalised as the
weights record (the run's mean/std and eval resize), so an image scores as in `lotus validate --data`.

examples:
  lotus predict exported/ photo1.png photo2.png              # CSV on stdout
  lotus predict runs/x images/ --top-k 3 --out preds.csv     # every image under images/, recursively
  lotus predict exported/ images/ --out preds.json           # JSON: [{"file", "top": [{"label", "score"}]}]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os

__all__ = ["add_arguments", "run", "predict"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="a run folder, a `lotus export` folder or a .safetensors file")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--which", choices=("best", "last"), help="run folder: best.safetensors (default) or last")
    p.add_argument(
        "--config",
        "-c",
        help="the training config, for weights that record no mean/std or classes (written by an older Lotus)",
    )
    p.add_argument("--top-k", type=int, default=5, help="labels per image, most probable first (default 5)")
    p.add_argument("--out", "-o", metavar="FILE", help="write .csv or .json here (default: CSV on stdout)")
    p.add_argument(
        "--format", choices=("csv", "json"), help="output format (default: from --out's extension, else csv)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")


def predict(src, files: list[str], top_k: int, batch_size: int = 64, device=None) -> list[dict]:
    """``[{"file", "top": [{"label", "index", "score"}, ...]}]`` for each file, in order (scores: softmax)."""
    import numpy as np
    import torch

    from lotus.data import batches
    from lotus.inference import ImageFiles, require_data

    data = require_data(src, "predict")
    names = [str(c) for c in data.get("classes") or []]
    dataset = ImageFiles(files, None, data)
    device = device or torch.device("cpu")
    model = src.model.to(device).eval()
    rows: list[dict] = []
    with torch.inference_mode():
        for x, _, idx in batches(dataset, np.arange(len(dataset)), batch_size):
            probs = model(x.to(device)).float().softmax(-1)
            scores, labels = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            for i, s, lab in zip(idx.tolist(), scores.cpu().tolist(), labels.cpu().tolist()):
                rows.append(
                    {
                        "file": files[i],
                        "top": [
                            {"label": names[c] if c < len(names) else str(c), "index": c, "score": v}
                            for c, v in zip(lab, s)
                        ],
                    }
                )
    return rows


def _csv(rows: list[dict], k: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", *[f"{f}_{j}" for j in range(1, k + 1) for f in ("label", "score")]])
    for r in rows:
        w.writerow([r["file"], *[v for t in r["top"] for v in (t["label"], f"{t['score']:.6f}")]])
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    from lotus.errors import LotusError
    from lotus.inference import image_files, load_source, resolve_device

    if args.top_k < 1:
        raise LotusError(f"--top-k: expected an int >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise LotusError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    fmt = args.format or ("json" if args.out and args.out.lower().endswith(".json") else "csv")
    files = image_files(args.images)
    src = load_source(args.source, args.which, args.config)
    rows = predict(src, files, args.top_k, args.batch_size, resolve_device(args.device))
    k = min(args.top_k, len(rows[0]["top"]))
    text = json.dumps(rows, indent=1) + "\n" if fmt == "json" else _csv(rows, k)
    if not args.out:
        print(text, end="")
        return 0
    from lotus.safe_io import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"{src.name}: top-{k} labels of {len(rows)} images -> {args.out}")
    return 0
