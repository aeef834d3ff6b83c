import numpy as np
import pytest
import torch

from lotus.config import config_from_dict
from lotus.data import Augmenter, batches, build_datasets
from lotus.errors import LotusError


def test_digits_split_is_deterministic_and_indexed():
    cfg = config_from_dict({"data": {"name": "digits", "val_fraction": 0.25, "split_seed": 3}}).data
    a = build_datasets(cfg, img_size=16)
    b = build_datasets(cfg, img_size=16)
    assert a.num_classes == 10 and a.in_chans == 1
    assert len(a.train) + len(a.val) == 1797 and abs(len(a.val) - 0.25 * 1797) < 2
    assert torch.equal(a.train.images, b.train.images)
    x, y, i = a.train[5]
    assert x.shape == (1, 16, 16) and i == 5 and y == int(a.labels_train[5])
    xb, yb, ib = a.train.get_batch(torch.tensor([5, 7]))
    assert torch.allclose(xb[0], x, atol=1e-6) and ib.tolist() == [5, 7]
    # normalised with train statistics
    assert abs(float(a.train.get_batch(torch.arange(len(a.train)))[0].mean())) < 0.1
    c = build_datasets(config_from_dict({"data": {"split_seed": 4}}).data, img_size=16)
    assert not torch.equal(a.train.labels[:50], c.train.labels[:50]) or not torch.equal(
        a.train.images[:50], c.train.images[:50]
    )


def test_channels_forced_and_limit():
    cfg = config_from_dict({"data": {"limit_train": 100}}).data
    d = build_datasets(cfg, img_size=8, in_chans=3)
    assert d.in_chans == 3 and len(d.train) == 100 and d.train[0][0].shape == (3, 8, 8)
    assert len(np.unique(d.labels_train)) == 10  # stratified


def _write_folder(root, classes, n, size, mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / split / c / f"{k}.png")


def test_imagefolder(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"], 3, (20, 12), "RGB")
    cfg = config_from_dict({"data": {"name": "imagefolder", "root": str(tmp_path)}}).data
    d = build_datasets(cfg, img_size=16)
    assert d.num_classes == 2 and d.in_chans == 3 and d.classes == ["cat", "dog"]
    x, y, i = d.train[4]
    assert x.shape == (3, 16, 16) and y == 1 and i == 4
    xs, ys, idx = next(batches(d.train, np.array([0, 4]), 2))
    assert xs.shape == (2, 3, 16, 16) and idx.tolist() == [0, 4] and ys.tolist() == [0, 1]


def test_imagefolder_grayscale_and_errors(tmp_path):
    _write_folder(tmp_path, ["a", "b"], 2, (10, 10), "L")
    cfg = config_from_dict({"data": {"name": "imagefolder", "root": str(tmp_path)}}).data
    assert build_datasets(cfg, img_size=8).in_chans == 1
    one = tmp_path / "one"
    _write_folder(one, ["only"], 2, (8, 8), "L")
    with pytest.raises(LotusError, match="only one class"):
        build_datasets(config_from_dict({"data": {"name": "imagefolder", "root": str(one)}}).data, img_size=8)
    with pytest.raises(LotusError, match="expected class folders in"):
        build_datasets(config_from_dict({"data": {"name": "imagefolder", "root": str(tmp_path / "nope")}}).data, 8)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(LotusError, match="data.root"):
        build_datasets(config_from_dict({"data": {"name": "imagefolder", "root": str(empty)}}).data, img_size=8)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_torchvision_missing_files_is_clear(tmp_path, name):
    cfg = config_from_dict({"data": {"name": name, "root": str(tmp_path)}}).data
    with pytest.raises(LotusError, match="set data.download: true"):
        build_datasets(cfg, img_size=16)


def test_mnist_from_local_files(tmp_path):
    """Write MNIST's raw idx files for a few images; the loader reads them like the real ones."""
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 6)):
        imgs = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    cfg = config_from_dict({"data": {"name": "mnist", "root": str(tmp_path)}}).data
    d = build_datasets(cfg, img_size=16)
    # a fifth of the training files is held out for validation; the t10k files are the test split
    assert len(d.train) == 16 and len(d.val) == 4 and len(d.test) == 6
    assert d.num_classes == 10 and d.train[3][0].shape == (1, 16, 16)


def _write_idx_gz(folder, prefix, images, labels):
    import gzip
    import struct

    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def test_fashion_mnist_debian_layout_val_and_test_splits(tmp_path):
    """Debian's dataset-fashion-mnist layout (four .gz files in one folder): a class-stratified validation
    split of data.val_size comes out of the training files, the t10k files are the test split."""
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 255, (200, 28, 28), dtype=np.uint8)
    train_y = (np.arange(200) % 10).astype(np.uint8)
    test_x, test_y = train_x[:30].copy(), train_y[:30].copy()
    _write_idx_gz(tmp_path, "train", train_x, train_y)
    _write_idx_gz(tmp_path, "t10k", test_x, test_y)
    cfg = config_from_dict({"data": {"name": "fashion_mnist", "root": str(tmp_path), "val_size": 20}}).data
    d = build_datasets(cfg, img_size=28)
    assert (len(d.train), len(d.val), len(d.test)) == (180, 20, 30)
    assert np.bincount(d.val.labels.numpy()).tolist() == [2] * 10  # stratified
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    seen = {bytes((d.train.images[i] * 255).round().to(torch.uint8).numpy()) for i in range(len(d.train))}
    assert not any(bytes((d.val.images[i] * 255).round().to(torch.uint8).numpy()) in seen for i in range(20))
    assert torch.equal((d.test.images[5, 0] * 255).round().to(torch.uint8), torch.from_numpy(test_x[5]))
    again = build_datasets(cfg, img_size=28)
    assert torch.equal(again.val.labels, d.val.labels) and torch.equal(again.val.images, d.val.images)


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    cfg = config_from_dict({"data": {"name": "fashion_mnist", "root": str(tmp_path)}}).data
    with pytest.raises(LotusError, match="apt-get install dataset-fashion-mnist"):
        build_datasets(cfg, img_size=28)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(LotusError, match="data.root: .*train-images-idx3-ubyte.gz"):
        build_datasets(cfg, img_size=28)


def test_augmenter_is_seeded_and_changes_images():
    cfg = config_from_dict(
        {"data": {"augment": {"random_crop": 2, "rotate": 10, "hflip": True, "random_erasing": 0.5}}}
    ).data
    x = torch.randn(8, 1, 16, 16)
    a, b = Augmenter(cfg.augment, 0), Augmenter(cfg.augment, 0)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and not torch.equal(ya, x) and ya.shape == x.shape


def test_a_resize_of_the_input_images_is_logged_once(tmp_path, tiny_cfg_dict):
    import json

    from lotus.config import config_from_dict
    from lotus.training import Trainer

    def events(img_size: int, name: str) -> tuple[list[dict], dict]:
        d = {**tiny_cfg_dict, "name": name, "output": {"dir": str(tmp_path / name)}}
        d["model"] = {**d["model"], "img_size": img_size}
        d["train"] = {**d["train"], "epochs": 2}
        Trainer(config_from_dict(d), quiet=True).fit()
        with open(tmp_path / name / "metrics.jsonl") as f:
            recs = [json.loads(line) for line in f]
        with open(tmp_path / name / "summary.json") as f:
            return [r for r in recs if r.get("event") == "data_resized"], json.load(f)["data"]

    resized, data = events(16, "up")  # digits are 8x8 px
    assert len(resized) == 1 and "8x8 px images are resized to 16x16" in resized[0]["note"]
    assert data["source_size"] == [8, 8] and data["img_size"] == 16
    assert events(8, "native")[0] == []
