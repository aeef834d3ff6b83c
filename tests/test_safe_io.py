"""Nothing outside the run folder, nothing silently replaced: names, symlinks, temp files, full disks, old states."""

from __future__ import annotations

import errno
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lotus.safe_io as safe_io
from lotus.cli import main
from lotus.config import config_from_dict
from lotus.errors import LotusError
from lotus.safe_io import FileLock, atomic_write_text, output_lock, remove_temps
from lotus.training.run_dir import RunDir


@pytest.fixture
def small_yaml(tiny_cfg_dict, tmp_path):
    tiny_cfg_dict["data"]["limit_train"] = 64
    tiny_cfg_dict["train"]["epochs"] = 1
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    return path


def _one_error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ run names
@pytest.mark.parametrize(
    "name, why",
    [
        ("../../x", "contains '/'"),
        ("/abs/path", "contains '/'"),
        ("a\\b", "contains"),
        ("..", "contains '..'"),
        ("", "is empty"),
    ],
)
def test_run_names_are_one_folder_name(name, why):
    with pytest.raises(LotusError, match=rf"^name: expected one folder name .*{why}"):
        config_from_dict({}, [f"name={name!r}" if name else "name=''"])


def test_a_bad_name_writes_nothing_anywhere(small_yaml, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(small_yaml), "--set", "name=../../escaped", "--quiet"]) == 2
    assert _one_error(capsys).startswith("error: name: expected one folder name")
    assert main(["train", "--config", str(small_yaml), "--set", f"name={'n' * 5000}", "--quiet"]) == 2
    assert _one_error(capsys) == "error: name: expected at most 128 bytes, got a name of 5000"
    assert sorted(os.listdir(tmp_path)) == ["small.yaml"] and not (tmp_path.parent / "escaped").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.img_size=100000", "model.img_size"),
        ("data.batch_size=1e23", "data.batch_size"),
        ("data.batch_size=100000000000000000000000", "data.batch_size"),
        ("data.batch_size=64.0", "data.batch_size"),
    ],
)
def test_absurd_sizes_name_their_key(override, key):
    with pytest.raises(LotusError, match=rf"^{key}: expected int"):
        config_from_dict({}, [override])


# ------------------------------------------------------------------------------------------------- symlinks
def test_a_symlinked_lock_is_refused_and_its_target_untouched(small_yaml, tmp_path, capsys):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious\n")
    os.symlink(victim, run / ".lock")
    assert main(["train", "--config", str(small_yaml), "--out", str(run), "--quiet"]) == 2
    assert "is a symbolic link" in _one_error(capsys)
    assert victim.read_text() == "precious\n"


def test_a_symlinked_out_is_refused(small_yaml, tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "run")
    assert main(["train", "--config", str(small_yaml), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert _one_error(capsys).startswith(f"error: output.dir: {tmp_path / 'run'} is a symbolic link")
    assert os.listdir(tmp_path / "elsewhere") == []


def test_writes_replace_a_symlink_never_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "summary.json")
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert victim.read_text() == "precious\n" and not os.path.islink(tmp_path / "summary.json")
    os.symlink(victim, tmp_path / "metrics.jsonl")
    with pytest.raises(LotusError, match="is a symbolic link"):
        safe_io.open_append(tmp_path / "metrics.jsonl")


# ------------------------------------------------------------------------------------------ locks, exclusive
def test_an_output_lock_names_the_holder_and_leaves_no_file(tmp_path):
    out = tmp_path / "t.npz"
    with output_lock(out, "--out"):
        with pytest.raises(
            LotusError, match=rf"^--out: {out} is in use by another Lotus process \(pid {os.getpid()}\)"
        ):
            output_lock(out, "--out").acquire()
    assert os.listdir(tmp_path) == []
    with output_lock(out, "--out"):  # free again
        pass


def test_a_lock_file_removed_by_its_holder_is_not_shared(tmp_path):
    path = str(tmp_path / ".x.lotus-lock")
    first = FileLock(path, "--out", "x", remove=True).acquire()
    first.release()
    second = FileLock(path, "--out", "x", remove=True).acquire()
    with pytest.raises(LotusError, match="in use"):
        FileLock(path, "--out", "x", remove=True).acquire()
    second.release()


def test_an_exclusive_write_never_replaces_a_file(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "first", exclusive=True, key="--out")
    with pytest.raises(LotusError, match=r"^--out: .*t.txt was created by another process meanwhile"):
        atomic_write_text(tmp_path / "t.txt", "second", exclusive=True, key="--out")
    assert (tmp_path / "t.txt").read_text() == "first" and os.listdir(tmp_path) == ["t.txt"]


# ----------------------------------------------------------------------------------------------- temp files
def test_run_dir_removes_every_kind_of_left_temp(tmp_path):
    run = RunDir(str(tmp_path / "r"))
    os.makedirs(run.path)
    for name in (".lotus-tmp-state.pt-abc", ".tmp-last.safetensors-x1", ".tmpAb12Cd", "keep.txt", ".tmpfile-kept"):
        open(run.file(name), "w").close()
    os.makedirs(run.file(".lotus-tmp-best.safetensors-q"))
    run.lock()
    try:
        gone = sorted(os.path.basename(p) for p in run.remove_stale_temps())
    finally:
        run.unlock()
    assert gone == [
        ".lotus-tmp-best.safetensors-q",
        ".lotus-tmp-state.pt-abc",
        ".tmp-last.safetensors-x1",
        ".tmpAb12Cd",
    ]
    assert sorted(os.listdir(run.path)) == [".lock", ".tmpfile-kept", "keep.txt"]


def test_remove_temps_of_one_name_only(tmp_path):
    for n in (".lotus-tmp-exp-1", ".lotus-tmp-exp2-1"):
        os.makedirs(tmp_path / n)
    assert [os.path.basename(p) for p in remove_temps(str(tmp_path), "exp")] == [".lotus-tmp-exp-1"]


def test_a_run_that_fails_before_writing_removes_its_folder(small_yaml, tmp_path, capsys):
    run = tmp_path / "new"
    code = main(
        [
            "train",
            "--config",
            str(small_yaml),
            "--set",
            "data.name=imagefolder",
            "--set",
            "data.limit_train=null",
            "--set",
            f"data.root={tmp_path / 'nothing'}",
            "--out",
            str(run),
            "--quiet",
        ]
    )
    assert code == 2 and "data.root" in _one_error(capsys)
    assert not run.exists()
    run.mkdir()  # a folder the user made stays, without a .lock
    main(
        [
            "train",
            "--config",
            str(small_yaml),
            "--set",
            "data.name=imagefolder",
            "--set",
            "data.limit_train=null",
            "--set",
            f"data.root={tmp_path / 'nothing'}",
            "--out",
            str(run),
            "--quiet",
        ]
    )
    assert run.is_dir() and os.listdir(run) == []


# ------------------------------------------------------------------------------------------------ full disk
def _fail_writes_after(monkeypatch, n_bytes: int, code: int = errno.ENOSPC) -> None:
    written = [0]
    real = os.write

    def write(fd, data):
        written[0] += len(data)
        if written[0] > n_bytes:
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(safe_io, "_os_write", write)


@pytest.mark.parametrize("name", ["state.pt", "last.safetensors"])
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(small_yaml, tmp_path, capsys, monkeypatch, name):
    run = tmp_path / "run"
    assert main(["train", "--config", str(small_yaml), "--out", str(run), "--quiet"]) == 0
    before = (run / name).read_bytes()
    from lotus.training import checkpointer

    real_save = checkpointer.save_state if name == "state.pt" else checkpointer.save_weights

    def failing(*a, **k):
        if name == "state.pt" or os.fspath(a[1]).endswith(name):
            _fail_writes_after(monkeypatch, 1000)
        return real_save(*a, **k)

    monkeypatch.setattr(checkpointer, "save_state" if name == "state.pt" else "save_weights", failing)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2", "--quiet"]) == 2
    line = _one_error(capsys)
    assert line == f"error: cannot write {run / name}: No space left on device (the previous file is kept)"
    assert (run / name).read_bytes() == before
    assert not [n for n in os.listdir(run) if n.startswith((".lotus-tmp", ".tmp"))]
    if name == "last.safetensors":
        assert load_file(run / name)


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path, monkeypatch):
    from lotus.training.run_log import RunLog

    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log = RunLog(str(tmp_path), write=True, show=False)
    log.open()
    try:
        monkeypatch.setattr(log._file, "flush", full)
        with pytest.raises(LotusError, match=rf"^cannot write {tmp_path / 'metrics.jsonl'}: No space left on device"):
            log.record({"type": "epoch", "epoch": 1})
    finally:
        monkeypatch.undo()
        log.close()


def test_a_read_only_output_folder_names_out(tmp_path, monkeypatch):
    real = os.open

    def ro_open(path, flags, *a):
        if os.fspath(path).endswith(".lotus-lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(LotusError, match=rf"^--out: cannot write {tmp_path / 'exp'}: Read-only file system$"):
        output_lock(tmp_path / "exp", "--out").acquire()


def test_a_read_only_target_is_one_line(tmp_path, monkeypatch):
    _fail_writes_after(monkeypatch, 0, errno.EROFS)
    with pytest.raises(
        LotusError, match=r"^--out: cannot write .*x.txt: Read-only file system \(nothing was written\)"
    ):
        atomic_write_text(tmp_path / "x.txt", "data", key="--out")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ old states
def test_an_old_state_without_the_scheduler_says_what_is_missing(small_yaml, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(small_yaml), "--out", str(run), "--quiet"]) == 0
    state = torch.load(run / "state.pt", weights_only=True)
    del state["scheduler"]
    torch.save(state, run / "state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2", "--quiet"]) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: resume: {run / 'state.pt'} was written by an older Lotus and lacks 'scheduler'")
    assert "--force" in line
