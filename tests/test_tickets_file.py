"""Ticket files: round trip, fingerprints, atomic save and every rejection case (one-line errors)."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from data_tickets import TicketFile, dataset_fingerprint, select
from data_tickets import ticket_file as tf_mod


class Images(Dataset):
    def __init__(self, n: int = 50, seed: int = 0, augment: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 6, 6, generator=g)
        self.labels = torch.arange(n) % 5
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:  # random train-time noise drawn from the global torch RNG
            x = x + 0.1 * torch.randn_like(x)
        return x, int(self.labels[i]), i


def make_ticket(ds: Dataset, **kw) -> TicketFile:
    scores = np.linspace(0, 1, len(ds)).astype(np.float32)
    idx = select(scores, "top", fraction=0.4, seed=3)
    fields = dict(
        scores=scores,
        scorer="el2n",
        policy="top",
        fraction=0.4,
        seed=3,
        proxy={"epochs": 2, "model": "mlp"},
        extra={"beta": 0.1},
    )
    fields.update(kw)
    return TicketFile.create(idx, dataset=ds, **fields)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_round_trip_with_patch_arrays(tmp_path):
    ds = Images()
    ranks = np.argsort(-np.random.default_rng(0).random((50, 9)), axis=1)
    t = make_ticket(ds, patch_indices=ranks[:, :4], patch_scores=np.random.default_rng(1).random((50, 9)))
    path = t.save(tmp_path / "sub" / "t.npz")  # parent folders are created
    u = TicketFile.load(path)
    assert np.array_equal(u.indices, t.indices) and u.indices.dtype == np.int64
    assert np.array_equal(u.scores, t.scores)
    assert np.array_equal(u.patch_indices, ranks[:, :4])
    assert np.allclose(u.patch_scores, t.patch_scores)
    for k in ("scorer", "policy", "fraction", "seed", "proxy", "extra", "version", "fingerprint"):
        assert getattr(u, k) == getattr(t, k), k
    assert u.count == 20 and u.size == 50 and u.path == str(path)
    assert set(u.fingerprint) >= {"size", "labels_sha256", "pixels_sha256"}
    u.validate_against(ds)
    u.validate_against(labels=ds.labels)
    with np.load(path, allow_pickle=False) as z:  # plain arrays + a JSON string, nothing pickled
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == "lotus-tickets" and meta["scorer"] == "el2n" and meta["count"] == 20
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))


def test_minimal_ticket_without_fingerprint(tmp_path):
    t = TicketFile(indices=[3, 1, 2])
    t.save(tmp_path / "m.npz")
    u = TicketFile.load(tmp_path / "m.npz")
    assert u.indices.tolist() == [3, 1, 2] and u.scores is None and u.fingerprint is None
    u.validate_against(labels=np.zeros(4))
    with pytest.raises(ValueError, match=r"out of range \[0, 3\)") as e:
        u.validate_against(labels=np.zeros(3))
    one_line(e)


def test_fingerprint_is_stable_under_random_augmentation():
    ds = Images(augment=True)
    a = dataset_fingerprint(ds)
    torch.rand(10)  # global RNG moves on
    assert dataset_fingerprint(ds) == a and a["pixels_sha256"] is not None
    assert dataset_fingerprint(Images(augment=False))["pixels_sha256"] != a["pixels_sha256"]


def test_unreproducible_reads_skip_the_pixel_hash():
    class Drifting(Images):
        calls = 0

        def __getitem__(self, i):
            Drifting.calls += 1
            return self.x[i] + Drifting.calls, int(self.labels[i]), i

    assert dataset_fingerprint(Drifting())["pixels_sha256"] is None


@pytest.mark.parametrize(
    "other,reason",
    [
        (lambda: Images(n=51), "dataset size differs"),
        (lambda: Images(seed=1), "sampled pixels hash differs"),
    ],
)
def test_fingerprint_mismatch(tmp_path, other, reason):
    make_ticket(Images()).save(tmp_path / "t.npz")
    t = TicketFile.load(tmp_path / "t.npz")
    with pytest.raises(ValueError, match=f"ticket file .*t.npz: dataset fingerprint mismatch: {reason}") as e:
        t.validate_against(other())
    one_line(e)


def test_label_mismatch(tmp_path):
    make_ticket(Images()).save(tmp_path / "t.npz")
    ds = Images()
    ds.labels = ds.labels.flip(0)
    with pytest.raises(ValueError, match="labels hash differs") as e:
        TicketFile.load(tmp_path / "t.npz").validate_against(ds)
    one_line(e)
    with pytest.raises(ValueError, match="labels hash differs"):
        TicketFile.load(tmp_path / "t.npz").validate_against(labels=ds.labels)


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _garbage_zip(path):
    import io

    buf = io.BytesIO()
    np.save(buf, _meta())
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("indices.npy", b"garbage")
        z.writestr("meta.npy", buf.getvalue())


def _meta(**over):
    m = {"format": "lotus-tickets", "format_version": 1, "fingerprint": {"size": 10, "labels_sha256": "x"}}
    m.update(over)
    return np.array(json.dumps(m))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "not a zip archive"),
        (lambda p: p.write_text("hello"), "not a zip archive"),
        (lambda p: np.save(open(p, "wb"), np.arange(3)), "not a zip archive"),
        (lambda p: _write_npz(p, indices=np.arange(3)), "missing array.*meta"),
        (lambda p: _write_npz(p, meta=_meta()), "missing array.*indices"),
        (lambda p: _write_npz(p, indices=np.array([1, "a"], dtype=object), meta=_meta()), "pickled objects"),
        (lambda p: _write_npz(p, indices=np.arange(3), meta=np.array("{not json")), "malformed metadata JSON"),
        (lambda p: _write_npz(p, indices=np.arange(3), meta=np.array(3)), "'meta' must be a JSON string"),
        (lambda p: _write_npz(p, indices=np.arange(3), meta=np.array(json.dumps({"a": 1}))), "not a lotus ticket"),
        (lambda p: _write_npz(p, indices=np.arange(3), meta=_meta(format_version=9)), "unsupported format_version 9"),
        (lambda p: _write_npz(p, indices=np.ones((2, 2), int), meta=_meta()), "1-D integer array"),
        (lambda p: _write_npz(p, indices=np.ones(3), meta=_meta()), "1-D integer array"),
        (lambda p: _write_npz(p, indices=np.array([1, 10]), meta=_meta()), r"index 10 out of range \[0, 10\)"),
        (lambda p: _write_npz(p, indices=np.array([-1, 2]), meta=_meta()), r"index -1 out of range"),
        (lambda p: _write_npz(p, indices=np.array([2, 2]), meta=_meta()), "duplicates"),
        (lambda p: _write_npz(p, indices=np.array([], dtype=int), meta=_meta()), "empty subset"),
        (lambda p: _write_npz(p, indices=np.arange(3), scores=np.ones(4), meta=_meta()), "scores has 4 entries"),
        (
            lambda p: _write_npz(p, indices=np.arange(3), scores=np.array(["a"] * 10), meta=_meta()),
            "'scores' has dtype",
        ),
        (
            lambda p: _write_npz(p, indices=np.arange(3), patch_indices=np.zeros((9, 2), int), meta=_meta()),
            "patch_indices must be",
        ),
        (
            lambda p: _write_npz(
                p, indices=np.arange(3), patch_indices=np.full((10, 2), 5), patch_scores=np.ones((10, 4)), meta=_meta()
            ),
            "only 4 patches",
        ),
        (lambda p: _write_npz(p, indices=np.arange(3), meta=_meta(fingerprint=[1])), "malformed fingerprint"),
        (lambda p: _garbage_zip(p), "not a valid .npz ticket file"),
    ],
)
def test_load_rejections(tmp_path, make, match):
    p = tmp_path / "bad.npz"
    make(p)
    exc = FileNotFoundError if match == "not found" else ValueError
    with pytest.raises(exc, match=match) as e:
        TicketFile.load(p)
    assert one_line(e).startswith(f"ticket file {p}")


def test_save_is_atomic_and_rejects_bad_targets(tmp_path, monkeypatch):
    ds = Images()
    path = tmp_path / "t.npz"
    make_ticket(ds).save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tf_mod.np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        make_ticket(ds, seed=9).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # old file untouched
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]  # no temp file left behind
    with pytest.raises(ValueError, match="expected a .npz file name"):
        make_ticket(ds).save(tmp_path / "t.txt")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        make_ticket(ds).save(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="out of range"):
        TicketFile(indices=[0, 60], fingerprint=dataset_fingerprint(ds)).save(tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_validate_requires_something():
    with pytest.raises(ValueError, match="pass the dataset"):
        TicketFile(indices=[0]).validate_against()


def test_class_balance_is_recorded(tmp_path):
    """The ticket says whether its selection was class-balanced; files written before the field read as False."""
    ds = Images()
    idx = select(np.linspace(0, 1, 50), "top", fraction=0.4, labels=ds.labels)  # balanced: the default
    assert np.bincount(ds.labels[idx].numpy(), minlength=5).tolist() == [4] * 5
    for flag in (True, False):
        t = TicketFile.create(idx, dataset=ds, scorer="el2n", policy="top", fraction=0.4, class_balanced=flag)
        u = TicketFile.load(t.save(tmp_path / f"{flag}.npz"))
        assert u.class_balanced is flag
        with np.load(tmp_path / f"{flag}.npz", allow_pickle=False) as z:
            assert json.loads(str(z["meta"]))["class_balanced"] is flag
    _write_npz(tmp_path / "old.npz", indices=np.arange(3), meta=_meta())  # no class_balanced key
    assert TicketFile.load(tmp_path / "old.npz").class_balanced is False
