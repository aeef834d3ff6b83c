"""``data.cache: memory`` for ImageFolder datasets: decode every image once, keep it as uint8, augment on the fly.

Without timm transforms the images are stored at the load size (``img_size`` x ``img_size``, the resize every
epoch would do) in one tensor, so batches are whole-tensor slices like the in-memory datasets. With
``data.transform`` the decoded images are kept at their own size (timm's random crops then see the same
pixels as without the cache). Decoding runs in ``data.num_workers`` DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lotus.errors import LotusError

__all__ = ["decode_all", "check_fits", "decoded", "Decoded", "NativeSize", "pil_to_chw", "chw_to_pil", "from_worker"]


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(n: int, first_shape: tuple[int, ...], where: str) -> None:
    """A :class:`LotusError` naming ``data.cache`` when ``n`` images like the first would take more than half of
    this machine's memory."""
    need = n * int(np.prod(first_shape))
    have = _memory_bytes()
    if have is not None and need > have // 2:
        raise LotusError(
            f"data.cache: memory would hold ~{need / 2**30:.1f} GiB of decoded images for {where} "
            f"({n} images), more than half of this machine's {have / 2**30:.1f} GiB; use data.cache: "
            "none with data.num_workers instead"
        )


class _Decode(Dataset):
    def __init__(self, n: int, decode: Callable[[int], np.ndarray]):
        self.n, self.decode = n, decode

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.decode(i))


def _as_list(items: list) -> list:
    return items


def decode_all(n: int, decode: Callable[[int], Any], num_workers: int) -> list[torch.Tensor]:
    """``[decode(i) for i in range(n)]`` as uint8 tensors, in ``num_workers`` DataLoader workers (numpy arrays
    in batches of 128 through the result pipe: one shared-memory tensor per image would cost more than its
    decode)."""
    loader = DataLoader(_Decode(n, decode), batch_size=128, num_workers=num_workers, shuffle=False, collate_fn=_as_list)
    return [torch.from_numpy(a) for chunk in loader for a in chunk]


def pil_to_chw(image: Any) -> np.ndarray:
    """A PIL image as a uint8 [C, H, W] array."""
    a = np.asarray(image, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def chw_to_pil(a: torch.Tensor, mode: str) -> Any:
    """A uint8 [C, H, W] tensor as a PIL image in ``mode`` (``L`` or ``RGB``)."""
    from PIL import Image

    a = a.numpy()
    image = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    return image if image.mode == mode else image.convert(mode)


def decoded(n: int, decode: Any, num_workers: int, where: str) -> list[torch.Tensor]:
    """``data.cache: memory``: every image decoded once (uint8), a one-line error for a bad file."""
    check_fits(n, tuple(decode(0).shape), where)
    try:
        return decode_all(n, decode, num_workers)
    except LotusError as e:
        raise from_worker(e) from None


class NativeSize:
    """Sample ``i`` of a folder decoded at its own size, uint8 [C, H, W] (picklable for DataLoader workers)."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __call__(self, i: int) -> np.ndarray:
        return pil_to_chw(self.ds.pil(i)[0])


class Decoded:
    """``i -> (PIL image, label)`` over decoded uint8 [C, H, W] images (a list or one tensor)."""

    def __init__(self, images: Any, labels: torch.Tensor, mode: str):
        self.images, self.labels, self.mode = images, labels, mode

    def __call__(self, i: int) -> tuple[Any, int]:
        return chw_to_pil(self.images[i], self.mode), int(self.labels[i])


def from_worker(e: LotusError) -> LotusError:
    """A LotusError re-raised by a DataLoader worker carries "Caught ... Original Traceback ..." text; get
    back the original one-line message (the traceback's last line, ``lotus.errors.X: message``)."""
    text = str(e).strip()
    if not text.startswith("Caught "):
        return e
    last = text.splitlines()[-1]
    name, sep, message = last.partition(": ")
    return type(e)(message if sep and name.endswith(type(e).__name__) else last)
