"""ImageFolder scanning: symlink loops and duplicates named, unreadable folders named, one class names data.root."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from lotus.config import config_from_dict
from lotus.data import build_datasets
from lotus.data_folder import scan_files
from lotus.errors import LotusError


def _folder(root, classes=("a", "b"), n=2):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(np.full((6, 6), 10 * k, np.uint8), "L").save(root / split / c / f"{k}.png")


def _build(root):
    return build_datasets(config_from_dict({"data": {"name": "imagefolder", "root": str(root)}}).data, img_size=8)


def test_same_samples_in_the_same_order_as_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    _folder(tmp_path, ("b", "a", "c"), 3)
    (tmp_path / "train" / "a" / "sub" / "deeper").mkdir(parents=True)
    for p in ("sub/x.png", "sub/deeper/y.png", "sub/z.txt"):
        Image.new("L", (4, 4)).save(tmp_path / "train" / "a" / p, format="png")
    (tmp_path / "elsewhere").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "elsewhere" / "w.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "c" / "linked")  # a symlinked folder is followed
    d = _build(tmp_path)
    assert d.train.folder.samples == ImageFolder(str(tmp_path / "train")).samples
    assert len(d.train) == 3 * 3 + 2 + 1


def test_a_symlink_loop_is_an_error_naming_it(tmp_path):
    _folder(tmp_path)
    os.symlink("..", tmp_path / "train" / "a" / "loop")  # train/a/loop -> train: 656 samples before
    with pytest.raises(LotusError, match=r"^data\.root: .*train/a/loop is a symlink loop"):
        _build(tmp_path)


def test_a_folder_reached_twice_is_an_error(tmp_path):
    _folder(tmp_path)
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "b" / "again")  # a's images labelled b too
    with pytest.raises(LotusError, match=r"^data\.root: .*train/b/again leads to .*train/a, which is already"):
        _build(tmp_path)


def test_an_unreadable_class_folder_is_a_permission_error_naming_it(tmp_path, monkeypatch):
    _folder(tmp_path)
    bad = tmp_path / "train" / "b"
    if os.geteuid() == 0:  # root reads anything: make the listing fail as it does for a user
        real = os.scandir

        def scandir(path):
            if os.fspath(path) == str(bad):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        bad.chmod(0)
    try:
        with pytest.raises(LotusError, match=rf"^data\.root: {bad}: permission denied"):
            _build(tmp_path)
    finally:
        bad.chmod(0o755)


def test_one_class_names_data_root_and_the_folder(tmp_path):
    _folder(tmp_path, ("only",))
    with pytest.raises(LotusError, match=r"^data\.root: .*train has only one class folder \(only\)"):
        _build(tmp_path)


def test_scan_files_shares_what_it_has_seen(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    seen: dict = {}
    assert scan_files(str(tmp_path / "x"), seen) == [str(tmp_path / "x" / "f")]
    with pytest.raises(LotusError, match="already scanned"):
        scan_files(str(tmp_path / "x"), seen)
