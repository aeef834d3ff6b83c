"""User errors, and the one line the CLI prints for any exception.

A :class:`LotusError` (or subclass) is a problem with the user's input: the CLI prints ``error: ...`` and
exits with code 2. An ``OSError`` about a file the user named (not found, permission, folder vs file) or
a full disk is reported the same way, naming the file. Anything else is a bug in Lotus: the CLI prints
``internal error: <Type>: <first line> (...)`` and exits with code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

__all__ = [
    "LotusError",
    "ConfigError",
    "RankError",
    "USER_EXIT",
    "INTERNAL_EXIT",
    "first_line",
    "describe",
    "library_error",
]

USER_EXIT = 2
INTERNAL_EXIT = 1

# OSErrors that are about a path the user gave (or its disk), not about Lotus
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP})


class LotusError(Exception):
    """A problem with the user's input (config, files, data); never a bug in Lotus."""

    #: under torchrun every rank raises the same error (config, data set-up), so only rank 0 prints it
    same_on_every_rank: bool = True


class ConfigError(LotusError):
    """A config value that is missing, unknown, of the wrong type or out of range."""


class RankError(LotusError):
    """A user error that only some ranks of a torchrun job see (this rank's device, a file in its data
    shard): every rank that raises it prints it."""

    same_on_every_rank = False


def first_line(e: BaseException) -> str:
    """The first non-empty line of ``str(e)``, or the exception's type name."""
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def library_error(e: ValueError, keys: Mapping[str, str], default: str) -> LotusError:
    """A library's one-line ``ValueError`` ``"field: reason"`` as a LotusError ``"<keys[field]>: reason"``
    naming the user's config key or flag (``"<default>: <message>"`` when the field is not in ``keys``).

    The libraries (``pruning``, ``data_tickets``) start their input errors with the bare field name.
    """
    text = first_line(e)
    field, sep, reason = text.partition(": ")
    if sep and field in keys:
        return LotusError(f"{keys[field]}: {reason}")
    return LotusError(f"{default}: {text}")


def _user_os_error(e: OSError) -> str | None:
    """``PATH: reason`` for an OSError about a user's file or disk, else None."""
    if isinstance(e, _PATH_ERRORS) or e.errno in _DISK_ERRNOS:
        reason = e.strerror or first_line(e)
        if e.filename is not None:
            return f"{e.filename}: {reason}"
        if e.errno in _DISK_ERRNOS:
            return reason
    return None


def _out_of_memory(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" and type(e).__module__.startswith("torch")


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) that the CLI prints for ``e``: user errors 2, internal errors 1."""
    if isinstance(e, LotusError):
        return USER_EXIT, f"error: {first_line(e)}"
    if isinstance(e, OSError):
        text = _user_os_error(e)
        if text is not None:
            return USER_EXIT, f"error: {text}"
    if _out_of_memory(e):
        return USER_EXIT, (
            "error: out of GPU memory; lower data.batch_size or plan memory with parallel.memory_budget "
            f"({first_line(e)[:160]})"
        )
    return INTERNAL_EXIT, (
        f"internal error: {type(e).__name__}: {first_line(e)} (a bug in Lotus; rerun with --debug for the traceback)"
    )
