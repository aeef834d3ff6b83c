"""Using a trained model: load it from a run folder, an export folder or a weights file, and read images as
the run evaluated them (for ``lotus validate`` and ``lotus predict``).

:func:`load_source` gives the model (built from the weights' recorded model section, as ``lotus export``
does) and its ``"data"`` metadata (mean/std, classes, eval preprocessing; :mod:`lotus.data_meta`).
:class:`ImageFiles` reads image files with :func:`lotus.data_meta.eval_transform`, so a folder of images is
preprocessed exactly as an ImageFolder run's validation split.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn
from torch.utils.data import Dataset

from lotus.errors import LotusError

__all__ = ["Source", "load_source", "resolve_device", "ImageFiles", "image_files", "folder_classes", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclasses.dataclass
class Source:
    """A loaded model and what it records about its inputs."""

    model: nn.Module
    name: str
    weights: str  # the .safetensors file read
    data: dict | None  # lotus.data_meta "data" metadata; None: unknown
    config: str | None  # the training config beside the weights (run folder), if any
    recorded: dict  # the weights file's other metadata (epoch, val_acc, ...)


def _weights_of(source: str, which: str | None, key: str) -> str:
    if (
        os.path.isdir(source)
        and os.path.isfile(os.path.join(source, "config.json"))
        and os.path.isfile(os.path.join(source, "model.safetensors"))
    ):  # a `lotus export` folder
        if which:
            raise LotusError(f"--which: only for a run folder; {source} is an export folder")
        return os.path.join(source, "model.safetensors")
    if os.path.isdir(source):
        path = os.path.join(source, f"{which or 'best'}.safetensors")
        if not os.path.isfile(path):
            raise LotusError(
                f"{key}: {source} has neither config.json + model.safetensors (an export folder) nor "
                f"{os.path.basename(path)} (a run folder)"
            )
        return path
    if not os.path.isfile(source):
        raise LotusError(f"{key}: no such run folder, export folder or weights file: {source}")
    if which:
        raise LotusError(f"--which: only for a run folder; {source} is a file")
    return source


def load_source(source: str, which: str | None = None, config: str | None = None, key: str = "SOURCE") -> Source:
    """The model in ``source`` (run folder: ``best``/``last`` by ``which``; export folder; weights file) with
    its data metadata; ``config`` (or the run's config.yaml) fills in what an older file does not record."""
    from lotus.commands.export import _lotus_model, _model_config
    from lotus.commands.export_content import export_data_metadata
    from lotus.weights_meta import read_metadata

    if config is not None and not os.path.isfile(config):
        raise LotusError(f"--config: config file not found: {config}")
    path = _weights_of(source, which, key)
    model, mcfg, _ = _lotus_model(path, _model_config(path, config))
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    run_config = config or (beside if os.path.isfile(beside) else None)
    data = export_data_metadata(path, config)
    if data is None and os.path.basename(path) == "model.safetensors":  # an export folder's config.json
        try:
            with open(os.path.join(os.path.dirname(path), "config.json")) as f:
                data = json.load(f).get("data")
        except (OSError, ValueError):
            data = None
    recorded = {k: v for k, v in read_metadata(path, key).items() if k not in ("model", "data", "widths")}
    return Source(model.eval(), mcfg.name, path, data, run_config, recorded)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` (an error when there is none)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise LotusError("--device: cuda requested but no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def image_files(paths: list[str], key: str = "IMAGES") -> list[str]:
    """The image files named by ``paths`` (files, or folders searched recursively, sorted)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(d, f) for d, _, files in os.walk(p) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise LotusError(f"{key}: {p} holds no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise LotusError(f"{key}: no such file or folder: {p}")
    return out


def folder_classes(root: str, key: str = "--data") -> tuple[list[str], list[tuple[str, str]]]:
    """An ImageFolder's class names (sub-folders, sorted) and its (file, class) pairs."""
    if not os.path.isdir(root):
        raise LotusError(f"{key}: no such folder: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise LotusError(f"{key}: {root} has no class sub-folders (expected ROOT/<class>/<image>)")
    pairs = [(f, c) for c in classes for f in image_files([os.path.join(root, c)], key)]
    return classes, pairs


class ImageFiles(Dataset):
    """Image files as ``(input, label, index)`` through the run's eval transform (labels -1 when unknown)."""

    def __init__(self, files: list[str], labels: list[int] | None, data: dict):
        from lotus.data_meta import eval_transform

        self.files, self.labels = list(files), list(labels) if labels is not None else [-1] * len(files)
        self.transform = eval_transform(data)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im.load()
                x = self.transform(im)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LotusError(f"{self.files[i]}: not a readable image ({reason})") from None
        return x, self.labels[i], i


def require_data(src: Source, what: str) -> dict:
    """The source's data metadata, or a one-line error saying how to supply it."""
    if src.data is None:
        raise LotusError(
            f"{src.weights} records no normalisation (mean/std) or classes (written by an older "
            f"Lotus?); {what} needs them: pass --config (the training config) so they are read off its data"
        )
    return src.data
