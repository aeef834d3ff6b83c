"""MNIST-format idx files (MNIST, Fashion-MNIST) read straight from disk, no torchvision download step.

Two layouts are searched under ``data.root``: the files themselves (Debian's ``dataset-fashion-mnist``
package puts ``train-images-idx3-ubyte.gz`` etc. in ``/usr/share/datasets/fashion-mnist``) and
torchvision's ``<root>/<FashionMNIST|MNIST>/raw/``. Each file may be gzipped or not.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

__all__ = ["IDX_DATASETS", "find_idx_files", "read_idx"]

# config name -> (torchvision folder, class names, where to get the files without a download)
IDX_DATASETS: dict[str, tuple[str, list[str], str]] = {
    "mnist": ("MNIST", [str(i) for i in range(10)], "set data.download: true to download it"),
    "fashion_mnist": (
        "FashionMNIST",
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "install Debian's package (apt-get install dataset-fashion-mnist) and set data.root: "
        "/usr/share/datasets/fashion-mnist, or set data.download: true to download it",
    ),
}

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def find_idx_files(root: str, name: str) -> dict[bool, tuple[str, str]] | None:
    """``{train: (images, labels)}`` for both splits in the first layout that has all four files, or None."""
    folder = IDX_DATASETS[name][0]
    for base in (root, os.path.join(root, folder, "raw")):
        found = {train: tuple(_find(base, stem) for stem in stems) for train, stems in _FILES.items()}
        if all(p is not None for pair in found.values() for p in pair):
            return found  # type: ignore[return-value]
    return None


def read_idx(path: str) -> np.ndarray:
    """One idx file (uint8 data, any rank) as an array; a ``ValueError`` naming the file when malformed."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise ValueError("not an idx file of unsigned bytes")
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = f.read()
    except (OSError, EOFError, struct.error) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if len(data) != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, got {len(data)}")
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(dims)  # writable: torch shares it
