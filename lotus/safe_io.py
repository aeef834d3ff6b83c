"""Writing files safely: atomic replaces, exclusive creates, locks, Lotus-named temp files, no symlinks.

The one place for these rules (every Lotus writer uses it):

* **Temp files** are named ``.lotus-tmp-<name>-XXXXXXXX`` (:data:`TEMP_PREFIX`). A write goes to a private
  temp *folder* of that name beside the target, so whatever a library writes on its own (safetensors,
  matplotlib) stays inside it; the finished file is renamed onto the target, and the folder removed.
  :func:`remove_temps` deletes what a killed writer left (only call it while holding the target's lock).
* **Renames never follow a symlink** at the target (``rename`` replaces the link itself); appends go through
  :func:`open_append` (``O_NOFOLLOW``); a lock file that is a symlink is refused (:class:`FileLock`).
* **Exclusive create** (``exclusive=True``): the file appears only if nothing is at its name yet, so two
  commands writing one output never both succeed.
* **Disk full / read-only / quota** while writing is a :class:`~lotus.errors.LotusError` naming the file and
  the cause; the previous file (if any) is untouched.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from lotus.errors import ConfigError, LotusError

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "atomic_write_stream",
    "atomic_write_text",
    "output_lock",
    "open_append",
    "FileLock",
    "remove_temps",
    "refuse_symlink",
    "check_run_name",
    "MAX_NAME_BYTES",
]

TEMP_PREFIX = ".lotus-tmp-"
# temp names of earlier Lotus versions (".tmp-<name>-*") and safetensors' own (".tmpXXXXXX")
_LEGACY_TEMP = re.compile(r"^\.tmp-.+|^\.tmp[A-Za-z0-9]{6}$")
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_os_write = os.write  # the one low-level write of streamed files (tests patch it to simulate a full disk)
MAX_NAME_BYTES = 128  # a run name, with "-<time>" appended, stays well below every file system's 255


def _disk_reason(e: BaseException, seen: OSError | None) -> str | None:
    """'No space left on device' (etc.) when ``e`` (or the OSError the file saw) is a disk problem."""
    for err in (seen, e):
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            return os.strerror(err.errno)
    text = str(e)
    for code in _DISK_ERRNOS:  # libraries that turn the OSError into their own type keep its text
        if os.strerror(code) in text:
            return os.strerror(code)
    return None


def _write_error(path: str, what: str, e: BaseException, seen: OSError | None = None) -> LotusError | None:
    reason = _disk_reason(e, seen)
    if reason is None and isinstance(e, PermissionError):
        reason = "permission denied"
    if reason is None:
        return None
    kept = "the previous file is kept" if os.path.lexists(path) else "nothing was written"
    where = f"{what}: cannot write {path}" if what != path else f"cannot write {path}"
    return LotusError(f"{where}: {reason} ({kept})")


def atomic_write(
    path: str | os.PathLike, write_fn: Callable[[str], None], *, exclusive: bool = False, key: str | None = None
) -> None:
    """Call ``write_fn(tmp_path)``, then move the finished file onto ``path`` in one rename.

    ``tmp_path`` lies in a private ``.lotus-tmp-*`` folder beside ``path``. ``exclusive``: fail with a one-line
    error (naming ``key`` or the path) if ``path`` exists when the file is published. A full or read-only disk
    is a one-line error naming ``path``."""
    path = os.fspath(path)
    what = key or path
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)[:80]}-", dir=folder)
    except OSError as e:
        raise _write_error(path, what, e) or e from None
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and safetensors) make 0600; use what open() would give
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, exclusive, what)
    except LotusError:
        raise
    except Exception as e:
        err = _write_error(path, what, e, getattr(e, "lotus_os_error", None))
        if err is None:
            raise
        raise err from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _publish(tmp: str, path: str, exclusive: bool, what: str) -> None:
    if not exclusive:
        os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target
        return
    try:
        os.link(tmp, path)  # fails if anything (a file, a link, a folder) has the name
    except FileExistsError:
        raise LotusError(
            f"{what}: {path} was created by another process meanwhile; "
            "nothing was overwritten (pass --force to replace it)"
        ) from None


class _GuardedFile(io.RawIOBase):
    """A raw file that remembers the first OSError of a write (libraries like torch.save hide it)."""

    def __init__(self, fd: int):
        self.fd, self.error = fd, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return _os_write(self.fd, b)
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write_stream(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], *, exclusive: bool = False, key: str | None = None
) -> None:
    """:func:`atomic_write` for writers that take a binary file object (``torch.save``, ``savefig``)."""

    def write_fn(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        raw = _GuardedFile(fd)
        try:
            with io.BufferedWriter(raw) as f:
                write(f)
        except Exception as e:
            if raw.error is not None:
                e.lotus_os_error = raw.error  # the cause torch/safetensors reported in other words
            raise
        finally:
            os.close(fd)

    atomic_write(path, write_fn, exclusive=exclusive, key=key)


def atomic_write_text(path: str | os.PathLike, text: str, key: str | None = None, exclusive: bool = False) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write_stream(path, lambda f: f.write(text.encode()), exclusive=exclusive, key=key)


def open_append(path: str | os.PathLike, key: str | None = None) -> BinaryIO:
    """Open ``path`` for appending (created if missing), refusing a symlink at it."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LotusError(
                f"{key or path}: {path} is a symbolic link; Lotus does not write through one (remove it)"
            ) from None
        raise
    return os.fdopen(fd, "ab")


def refuse_symlink(path: str | os.PathLike, key: str) -> None:
    """A one-line error if ``path`` itself is a symlink (an output folder or file must be the real one)."""
    path = os.fspath(path)
    if os.path.islink(path.rstrip(os.sep) or path):
        raise LotusError(
            f"{key}: {path} is a symbolic link (to {os.readlink(path.rstrip(os.sep))}); "
            "Lotus does not write through one: pass the real folder or another path"
        )


class FileLock:
    """An exclusive ``flock`` on a lock file, taken without blocking; the file holds the holder's pid.

    ``remove``: delete the lock file on release (an output's sibling lock); a second process that opened the
    old file sees that it is gone and takes a fresh one. ``shared``: a reader's lock (``LOCK_SH``: refused while
    a writer holds the file, the holder's pid left as it is, a lock file it had to create removed again). A
    lock file that is a symlink is refused."""

    def __init__(self, path: str, key: str, busy: str, remove: bool = False, shared: bool = False):
        self.path, self.key, self.busy, self.remove, self.shared = path, key, busy, remove, shared
        self._fd: int | None = None

    def _open(self) -> int:
        try:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise LotusError(
                    f"{self.key}: cannot write {self.busy}: a part of its path is a file, not a folder"
                ) from None
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LotusError(
                    f"{self.key}: {self.path} is a symbolic link; Lotus does not write through one (remove it)"
                ) from None
            raise LotusError(f"{self.key}: cannot write {self.busy}: {e.strerror or e}") from None

    def acquire(self) -> FileLock:
        """Take the lock or raise a one-line error naming the process that holds it."""
        while True:
            existed = os.path.lexists(self.path)
            fd = self._open()
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LotusError(
                    f"{self.key}: {self.busy} is in use by another Lotus process (pid {holder}); "
                    "wait for it to finish or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it while we opened it: take the new one
        if self.shared:
            self.remove = self.remove or not existed
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(path: str, key: str) -> FileLock:
    """The lock of a command's output (a file or a folder): ``.<name>.lotus-lock`` beside it, removed after."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path.rstrip(os.sep) or path)
    return FileLock(os.path.join(parent, f".{name}.lotus-lock"), key, path, remove=True)


def remove_temps(folder: str, name: str | None = None, legacy: bool = False) -> list[str]:
    """Delete temp files/folders a killed writer left in ``folder`` (those for ``name`` only, when given).

    ``legacy``: also earlier versions' ``.tmp-*`` and safetensors' ``.tmpXXXXXX`` (in a locked run folder)."""
    if not os.path.isdir(folder):
        return []
    prefix = TEMP_PREFIX + (f"{name[:80]}-" if name else "")
    gone = []
    for n in sorted(os.listdir(folder)):
        if not (n.startswith(prefix) or (legacy and _LEGACY_TEMP.match(n))):
            continue
        p = os.path.join(folder, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)
        gone.append(p)
    return gone


def check_run_name(name: str, key: str = "name") -> None:
    """A run name is one folder name: no path separators, no ``..``, not empty, at most 128 bytes."""
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if not name.strip() or bad or ".." in name:
        why = "is empty" if not name.strip() else f"contains {bad[0]!r}" if bad else "contains '..'"
        raise ConfigError(
            f"{key}: expected one folder name (no '/', '\\' or '..'), got {name[:60]!r}, which "
            f"{why}; choose where runs go with --out or output.dir"
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"{key}: expected at most {MAX_NAME_BYTES} bytes, got a name of {len(name.encode())}")
