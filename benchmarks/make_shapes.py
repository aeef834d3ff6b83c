"""Write a synthetic ImageFolder dataset (no download): 8 classes of noisy shapes on textured backgrounds.

Used to check that configs tuned on digits still behave on another ImageFolder dataset::

    python benchmarks/make_shapes.py --out data/shapes32 --size 32     # 8 x (250 train + 60 val), 32 px
    lotus train --config configs/shapes32_op.yaml                     # 32 px / patch 4 = 64 tokens
    python benchmarks/lotus_schedule.py --datasets shapes32           # (makes the folder itself if missing)

Classes: filled/outlined circle, square, triangle, cross, at random position, size, colour and rotation,
with Gaussian noise, so the task needs real shape features (not colour or position).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "ring", "square", "frame", "triangle", "triangle_outline", "cross", "x"]


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rot: float, color: tuple) -> None:
    def poly(n: int, offset: float) -> list[tuple[float, float]]:
        return [
            (
                cx + r * math.cos(rot + offset + 2 * math.pi * k / n),
                cy + r * math.sin(rot + offset + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    w = max(1, int(r / 3))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=w)
    elif kind == "square":
        draw.polygon(poly(4, math.pi / 4), fill=color)
    elif kind == "frame":
        draw.polygon(poly(4, math.pi / 4), outline=color, width=w)
    elif kind == "triangle":
        draw.polygon(poly(3, 0), fill=color)
    elif kind == "triangle_outline":
        draw.polygon(poly(3, 0), outline=color, width=w)
    elif kind in ("cross", "x"):
        a = rot + (0 if kind == "cross" else math.pi / 4)
        for t in (a, a + math.pi / 2):
            dx, dy = r * math.cos(t), r * math.sin(t)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=color, width=w + 1)


def make(out: str, n_train: int, n_val: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in CLASSES:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
            for i in range(n):
                bg = rng.integers(0, 120, 3)
                img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
                draw = ImageDraw.Draw(img)
                r = rng.uniform(size * 0.2, size * 0.38)
                cx, cy = rng.uniform(r, size - r, 2)
                rot = rng.uniform(0, 2 * math.pi) if c not in ("cross", "x") else rng.uniform(-0.3, 0.3)
                color = tuple(int(v) for v in rng.integers(130, 256, 3))
                _shape(draw, c, cx, cy, r, rot, color)
                arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 18, (size, size, 3))
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(out, split, c, f"{i:05d}.png"))


def dataset_cli(
    doc: str, make_fn: Callable[[str, int, int, int, int], None], n_classes: int, out: str, train: int, val: int
) -> None:
    """The command line of a dataset generator (this one and make_textures.py): --out/--train/--val/--size/--seed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out)
    ap.add_argument("--train", type=int, default=train, help=f"train images per class (default {train})")
    ap.add_argument("--val", type=int, default=val, help=f"val images per class (default {val})")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make_fn(a.out, a.train, a.val, a.size, a.seed)
    print(f"wrote {a.out}: {n_classes} classes x ({a.train} train + {a.val} val) images of {a.size} px")


if __name__ == "__main__":
    dataset_cli(__doc__, make, len(CLASSES), "data/shapes", 250, 60)
