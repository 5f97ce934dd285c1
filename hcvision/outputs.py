"""Where an entry point writes: checked before any work, and one writer per run directory.

- :func:`check_writable` proves that an output location can be created and written by creating (and removing) a probe
  file in its nearest existing parent: permission bits do not tell the truth for root, a read-only mount or a file
  system such as /sys. A location under a regular file, or one that cannot be written, is a
  :class:`~hcvision.cli.UsageError` in one line, before anything is computed or written.
- :class:`RunLock` holds an OS-level exclusive lock (``flock``) on ``<dir>/.lock`` for a run's lifetime. A second
  process on the same directory is refused naming the holder (host, PID, start time, which the file holds as text);
  the kernel drops the lock when its holder dies however it dies, so a crashed run leaves nothing to clean up and
  ``resume=auto`` just works (a killed holder's file stays behind, unlocked and harmless; forked children such as
  DataLoader workers close their copy, so they do not keep a dead run's lock). Where the file system
  cannot lock, a warning is printed once and the run goes on.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import ContextManager, Optional, Union

from .cli import UsageError, is_main_rank

__all__ = ["check_writable", "RunLock", "run_dir_lock", "LOCK_NAME"]

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".lock"
# errnos with which a file system says it does not do locks (NFS without lockd, some FUSE mounts)
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_warned_no_locking = False
_held_fds: set = set()


def _close_in_forked_child() -> None:
    """A forked child (a DataLoader worker) would share the lock and keep it after its parent was killed, until the
    worker noticed and exited; the lock belongs to the parent alone."""
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


def check_writable(path: PathLike, key: str = "--out", is_dir: bool = True) -> Path:
    """Refuse, before any work, an output location that cannot be created and written.

    ``path`` is a directory (``is_dir``) or a file to be. The nearest existing parent (``path`` itself for an
    existing directory) must be a directory in which a probe file can be created; the probe is removed at once.
    """
    path = Path(path)
    if path.exists() and is_dir and not path.is_dir():
        raise UsageError(f"{key}={str(path)!r} is a file, not a directory; accepted: a directory path")
    if path.is_dir() and not is_dir:
        raise UsageError(f"{key}={str(path)!r} is a directory; accepted: a file path")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{key}={str(path)!r} cannot be created: {str(parent)!r} is a regular file, not a directory; "
                         "accepted: a path under a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".hcv-write-probe-")
    except OSError as err:
        raise UsageError(f"{key}={str(path)!r} cannot be written: creating a file in {str(parent)!r} failed "
                         f"({err.strerror or type(err).__name__}); accepted: a location this user can write "
                         "(not a read-only mount)") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _holder_text() -> str:
    return (f"host {socket.gethostname()}, PID {os.getpid()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime())}")


class RunLock:
    """Exclusive, OS-level lock on ``<directory>/.lock`` held until :meth:`release` or the process ends.

    ``with RunLock(out, "output_dir"):`` or ``lock = RunLock(...).acquire()``. The directory is created if needed
    (the lock file is the first thing a run writes). Contention is a :class:`UsageError` naming the holder.
    """

    def __init__(self, directory: PathLike, key: str = "output_dir") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.key = key
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        global _warned_no_locking
        if self._fd is not None:
            return self
        missing = [d for d in (self.directory, *self.directory.parents) if not d.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created = missing  # removed again on release when still empty (a refused run leaves no trace)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"
                    os.close(fd)
                    self._remove_created()
                    raise UsageError(f"{self.key}={str(self.directory)!r} is in use by another process ({holder}); "
                                     f"wait for it to end or stop it, or choose another {self.key}") from None
                os.close(fd)
                if err.errno not in _NO_LOCKING:
                    raise
                if not _warned_no_locking:
                    _warned_no_locking = True
                    print(f"warning: the file system of {str(self.directory)!r} cannot lock {LOCK_NAME} "
                          f"({err.strerror}); nothing stops a second process from writing into it at the same time",
                          file=sys.stderr, flush=True)
                return self
            try:  # the holder we waited for may have removed the file: then we locked an orphan, try again
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
        self._fd = fd
        _held_fds.add(fd)
        return self

    def _remove_created(self) -> None:
        for d in getattr(self, "_created", []):
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        """Remove the lock file and drop the lock; directories the lock created are removed when still empty.

        The file is unlinked while still locked, and :meth:`acquire` checks that the file it locked is still the one
        at the path, so a process that opened the old file meanwhile does not end up holding a lock no one sees."""
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            _held_fds.discard(self._fd)
            os.close(self._fd)
            self._fd = None
            self._remove_created()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_dir_lock(directory: PathLike, key: str = "--out") -> ContextManager[object]:
    """What an entry point that owns ``directory`` does first: :func:`check_writable`, then, on rank 0 (the only
    process that writes the shared files), hold its :class:`RunLock` for the ``with`` block."""
    check_writable(directory, key)
    return RunLock(directory, key) if is_main_rank() else contextlib.nullcontext()
