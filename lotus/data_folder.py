"""Scanning an ImageFolder tree (``data.name: imagefolder``) safely.

torchvision's ``ImageFolder`` walks class folders with ``os.walk(followlinks=True)`` and skips folders it
cannot list, so a symlink loop (``train/a/loop -> ..``) multiplies the data set and an unreadable class
folder turns into "Found no valid file". :func:`image_folder` keeps torchvision's layout and sample order
but scans every real folder at most once:

* symlinked folders are followed (a class folder may live elsewhere), but a symlink that leads back into a
  folder being scanned (a loop) or to a folder already scanned (its images would count twice) is an error
  naming the symlink;
* a folder that cannot be listed is a permission error naming it;
* fewer than two class folders is an error naming ``data.root``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from lotus.errors import LotusError

__all__ = ["image_folder", "scan_files"]

KEY = "data.root"


def _list(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise LotusError(
            f"{KEY}: {folder}: permission denied (the folder cannot be listed); make it readable or remove it"
        ) from None
    except NotADirectoryError:
        raise LotusError(f"{KEY}: {folder}: expected a folder") from None


def _identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except PermissionError:
        raise LotusError(f"{KEY}: {path}: permission denied") from None
    return st.st_dev, st.st_ino


def scan_files(top: str, seen: dict[tuple[int, int], str] | None = None) -> list[str]:
    """Every non-folder entry under ``top`` in ``sorted(os.walk(top, followlinks=True))`` order, each real folder
    scanned once (``seen``: real folders already scanned, shared between calls, mapped to where they were)."""
    seen = {} if seen is None else seen
    found: list[tuple[str, list[str]]] = []
    _scan(top, seen, set(), found)
    return [os.path.join(root, name) for root, names in sorted(found) for name in names]


def _scan(folder: str, seen: dict, open_: set, found: list, link: str | None = None) -> None:
    """Scan ``folder``; ``link``: the innermost symlink on the way to it (the culprit a loop names)."""
    ident = _identity(folder)
    culprit = link or folder
    if ident in open_:
        raise LotusError(f"{KEY}: {culprit} is a symlink loop ({folder} leads back to {seen[ident]}); remove it")
    if ident in seen:
        raise LotusError(
            f"{KEY}: {culprit} leads to {seen[ident]}, which is already scanned (its images would "
            "count twice); remove one of them"
        )
    seen[ident] = folder
    open_.add(ident)
    files = []
    for entry in _list(folder):
        if entry.is_dir():  # follows symlinks, as os.walk(followlinks=True) does
            _scan(entry.path, seen, open_, found, entry.path if entry.is_symlink() else link)
        else:
            files.append(entry.name)
    found.append((folder, files))
    open_.discard(ident)


class _SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder over :func:`scan_files`."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in _list(directory) if e.is_dir())
        if len(classes) < 2:
            got = f"only one class folder ({classes[0]})" if classes else "no class folders"
            raise LotusError(f"{KEY}: {directory} has {got}; imagefolder needs >= 2 (one folder of images per class)")
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(
        directory: str,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        valid = is_valid_file or (lambda p: has_file_allowed_extension(p, extensions or IMG_EXTENSIONS))
        seen: dict[tuple[int, int], str] = {}
        samples = []
        for cls in sorted(class_to_idx):
            files = [p for p in scan_files(os.path.join(directory, cls), seen) if valid(p)]
            if not files and not allow_empty:
                raise LotusError(
                    f"{KEY}: {os.path.join(directory, cls)}: no image files "
                    f"({', '.join(extensions or IMG_EXTENSIONS)}) in this class folder"
                )
            samples += [(p, class_to_idx[cls]) for p in files]
        return samples


def image_folder(path: str) -> ImageFolder:
    """The ImageFolder at ``path`` (``root/<class>/**/<image>``), scanned as the module docstring says."""
    return _SafeImageFolder(path)
