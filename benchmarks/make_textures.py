"""Write a synthetic ImageFolder dataset (no download): 10 classes of textures pasted on cluttered backgrounds.

A harder, more-token stand-in for digits and shapes (deterministic from ``--seed``)::

    python benchmarks/make_textures.py --out data/textures          # 10 x (350 train + 150 val) = 5 000 images, 32 px
    lotus train --config configs/textures_op.yaml

Each image is a low-frequency colour background with Gaussian noise and a few distractor strokes; one random
rectangle (40-75 % of the side) holds the class texture at a random colour, contrast, frequency and phase, so
the label lives in part of the image only (what attention-ranked patch tickets should find). Classes: stripes
at 0/45/90/135 degrees (+-12 degrees jitter), checkerboard, dot grid, concentric rings, zigzag, crosshatch,
thresholded blobs.
"""

from __future__ import annotations

import os

import numpy as np
from make_shapes import dataset_cli  # the same command line (run from benchmarks/ or with it on sys.path)
from PIL import Image

CLASSES = [
    "stripes_000",
    "stripes_045",
    "stripes_090",
    "stripes_135",
    "checker",
    "dots",
    "rings",
    "zigzag",
    "crosshatch",
    "blobs",
]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinear upsampling of a ``cells x cells`` uniform grid to ``size x size`` (values in [0, 1])."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A ``h x w`` pattern in [0, 1] of class ``kind``."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    period = rng.uniform(3.0, 6.0)
    phase = rng.uniform(0, 2 * np.pi)
    k = 2 * np.pi / period
    if kind.startswith("stripes"):
        a = np.radians(float(kind.split("_")[1]) + rng.uniform(-12, 12))
        return (np.sin(k * (x * np.cos(a) + y * np.sin(a)) + phase) > 0).astype(float)
    a = rng.uniform(-0.3, 0.3)
    u, v = x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)
    if kind == "checker":
        return ((np.sin(k * u + phase) > 0) ^ (np.sin(k * v + phase) > 0)).astype(float)
    if kind == "dots":
        return ((np.cos(k * u + phase) + np.cos(k * v + phase)) > 1.0).astype(float)
    if kind == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        return (np.sin(k * np.hypot(y - cy, x - cx) + phase) > 0).astype(float)
    if kind == "zigzag":
        amp = rng.uniform(1.0, 2.5)
        return (np.sin(k * (v + amp * np.abs(((u / period) % 2) - 1) * period) + phase) > 0).astype(float)
    if kind == "crosshatch":
        return ((np.abs(np.sin(k * u / 2 + phase)) < 0.3) | (np.abs(np.sin(k * v / 2 + phase)) < 0.3)).astype(float)
    if kind == "blobs":
        n = _smooth_noise(rng, max(h, w), int(rng.integers(3, 6)))[:h, :w]
        return (n > np.median(n)).astype(float)
    raise ValueError(f"unknown texture {kind!r}")


def _image(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    bg = np.stack([_smooth_noise(rng, size, 3) for _ in range(3)], -1) * rng.uniform(60, 140) + rng.uniform(0, 60)
    for _ in range(int(rng.integers(2, 5))):  # distractor strokes
        y0, x0 = rng.integers(0, size, 2)
        ang = rng.uniform(0, np.pi)
        length = int(rng.integers(size // 4, size // 2))
        for t in range(length):
            yy, xx = int(y0 + t * np.sin(ang)) % size, int(x0 + t * np.cos(ang)) % size
            bg[yy, xx] = rng.uniform(80, 255, 3)
    h, w = (int(rng.uniform(0.40, 0.75) * size) for _ in range(2))
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    pat = _texture(rng, kind, h, w)[..., None]
    fg, back = rng.uniform(120, 255, 3), rng.uniform(0, 100, 3)
    contrast = rng.uniform(0.45, 1.0)
    region = back + (fg - back) * pat * contrast
    bg[top : top + h, left : left + w] = region
    bg += rng.normal(0, 22, bg.shape)
    return bg.clip(0, 255).astype(np.uint8)


def make(out: str, n_train: int, n_val: int, size: int, seed: int) -> None:
    """Write ``out/{train,val}/<class>/<i>.png``; the same arguments always give the same files."""
    for s, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for c, kind in enumerate(CLASSES):
            rng = np.random.default_rng([seed, s, c])
            os.makedirs(os.path.join(out, split, kind), exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(rng, kind, size)).save(os.path.join(out, split, kind, f"{i:05d}.png"))


if __name__ == "__main__":
    dataset_cli(__doc__, make, len(CLASSES), "data/textures", 350, 150)
