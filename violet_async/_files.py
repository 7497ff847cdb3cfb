"""Opening the files a run trusts (journal, its lock, problems file, ``--output``) so
that another local user cannot plant one.

A file in a shared directory may have been put there by someone else: a journal with a
forged line, or a symlink to a victim file that a run would truncate, rewrite and
re-mode. :func:`open_owned` opens without following a symlink (``O_NOFOLLOW``; where a
platform has none, the path is checked with ``lstat`` first), then checks the file it
opened: a regular file, owned by this process's user, writable by nobody else, with
no other name (a hard link planted under the name is another name of a file of ours).
Anything else raises :class:`UnsafeFileError` before a byte is read or written.
"""

from __future__ import annotations

import errno
import os
import stat

from .exceptions import VioletError

__all__ = [
    "CLOEXEC",
    "NOFOLLOW",
    "NONBLOCK",
    "SQLITE_COMPANIONS",
    "UnsafeFileError",
    "narrow_to_owner",
    "open_owned",
    "owned_by_another",
]

#: The files SQLite reads beside a database: the WAL, its index, and a rollback journal
#: (a "hot" one, left by a writer that died, is played back into the database when it
#: is next opened, WAL mode included). Each is held to the database file's checks.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

# Each 0 where the platform has none (Windows has none of the three).
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# A FIFO planted under the name would block an open for reading forever.
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafeFileError(VioletError):
    """A file the run would read or write is not safe to trust: a symlink, not a
    regular file, owned by another user, or writable by others. ``path`` names it."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(
            f"{os.fspath(path)}: {problem}; refusing to use it (move it away, or name "
            "another file): a file another user can write could forge a record"
        )
        self.path = os.fspath(path)
        self.problem = problem


def open_owned(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open(path, flags, mode)``, refusing what another user could have planted
    (see the module docstring). Returns the descriptor; raises
    :class:`UnsafeFileError`, or the ``OSError`` of the open (no such file, ...)."""
    if not NOFOLLOW:  # pragma: no cover - platforms without O_NOFOLLOW (Windows)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise UnsafeFileError(path, "it is a symbolic link")
        except FileNotFoundError:
            pass
    try:
        fd = os.open(path, flags | NOFOLLOW | NONBLOCK | CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (
            # FreeBSD and macOS say EMLINK for a symlink under O_NOFOLLOW.
            exc.errno == errno.EMLINK and NOFOLLOW
        ):
            raise UnsafeFileError(path, "it is a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, opened for writing
            raise UnsafeFileError(path, "it is not a regular file") from None
        raise
    try:
        check_owned(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def narrow_to_owner(fd: int) -> None:
    """Mode 0600 for a file a run writes (one left wider by an older version too).
    Python on Windows has ``os.fchmod`` only from 3.13, and there a file's mode bits
    say only whether it is read-only: without it, nothing to narrow."""
    fchmod = getattr(os, "fchmod", None)
    if fchmod is not None:
        fchmod(fd, 0o600)


def owned_by_another(info: os.stat_result) -> bool:
    """Whether ``info`` is a file of another user (never on Windows, which has no uids)."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and info.st_uid != geteuid()


def check_owned(fd: int, path: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsafeFileError` unless ``fd`` is a regular file of this user that
    no one else may write, and that has no other name (no hard link)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(path, "it is not a regular file")
    if owned_by_another(info):
        raise UnsafeFileError(path, f"it is owned by another user (uid {info.st_uid})")
    if info.st_nlink > 1:
        # A hard link planted under the name: another name of a file of ours (a
        # victim's file a run would truncate or append to), where the system lets a
        # user link a file they do not own (macOS, the BSDs, protected_hardlinks=0).
        raise UnsafeFileError(
            path, f"it has {info.st_nlink} names (a hard link to a file kept elsewhere)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFileError(
            path, f"others may write it (mode {stat.S_IMODE(info.st_mode):04o}; chmod go-w)"
        )
