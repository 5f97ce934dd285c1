"""What a user sees when something is wrong: one error type, one wrapper, used by every entry point.

A foreseeable problem (a wrong path, key, value or image size, a corrupt or foreign checkpoint, a resume that
does not fit) raises :class:`UsageError` with one line naming the bad value and what is accepted; the wrapper
prints ``<prog>: error: <line>`` and exits 2. A full file system or a spent quota (ENOSPC, EDQUOT) is not the
user's input but not a bug either: one line naming the path, exit :data:`EXIT_OUT_OF_SPACE`. Anything else is a bug
in hcvision and keeps its traceback.

Exit codes of every entry point: 0 done, 1 non-finite loss (trainers), 2 bad input, 3 out of space, 128+N stopped by
signal N (130: Ctrl-C).
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

__all__ = ["UsageError", "OutOfSpaceError", "EXIT_OUT_OF_SPACE", "out_of_space", "run_cli", "is_main_rank"]

EXIT_OUT_OF_SPACE = 3
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip writer reports a short write this way, without an errno (its iostream error is in the message)
_SHORT_WRITE = "unexpected pos"
_NEARLY_FULL_BYTES = 16 << 20


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class OutOfSpaceError(RuntimeError):
    """A write of ``path`` failed because the file system is full or the quota is spent: one line, exit 3.

    ``what`` says what was cleaned up and ``then`` what to do; the run's owner (e.g. the trainer) may re-word them.
    """

    def __init__(self, path: Union[str, os.PathLike], why: str, what: str = "the partial file was removed",
                 then: str = "free space and run the same command again") -> None:
        self.path, self.why, self.what, self.then = str(path), why, what, then
        super().__init__(f"out of space writing {self.path!r} ({why}); {what}; {then}")


def _free_bytes(path: Union[str, os.PathLike]) -> Optional[int]:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def out_of_space(err: BaseException, path: Optional[Union[str, os.PathLike]] = None) -> Optional[str]:
    """Why ``err`` means "no space" (``"ENOSPC: No space left on device"``), or ``None`` when it does not.

    An ``OSError`` with errno ENOSPC/EDQUOT anywhere in the exception chain counts, and so do the writers that lose
    the errno: safetensors (its message carries the OS text) and torch.save (a short write, "unexpected pos", counted
    only when the file system of ``path`` has less than 16 MiB left).
    """
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutOfSpaceError):
            return e.why
        if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
            return f"{errno.errorcode[e.errno]}: {os.strerror(e.errno)}"
        text = str(e)
        for code in _NO_SPACE_ERRNOS:
            if os.strerror(code) in text:
                return f"{errno.errorcode[code]}: {os.strerror(code)}"
        if _SHORT_WRITE in text and path is not None:
            free = _free_bytes(path)
            if free is not None and free < _NEARLY_FULL_BYTES:
                return f"ENOSPC: short write with {free} bytes left on the file system"
        e = e.__cause__ or e.__context__
    return None


def is_main_rank() -> bool:
    """True on the process that should print and write (rank 0, or the only process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            prog: Optional[str] = None) -> int:
    """Run ``main(argv)`` and map foreseeable errors to exit codes: 2 for :class:`UsageError`, 3 when out of space
    (:class:`OutOfSpaceError`, or any ENOSPC/EDQUOT error that reaches here), 130 for Ctrl-C.

    Only rank 0 prints the error line, so a multi-process launch shows it once.
    """
    prog = prog or os.path.basename(sys.argv[0] or "hcvision")
    try:
        return int(main(argv) or 0)
    except UsageError as err:
        if is_main_rank():
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except OutOfSpaceError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_OUT_OF_SPACE
    except (OSError, RuntimeError) as err:
        why = out_of_space(err)
        if why is None:
            raise
        where = getattr(err, "filename", None)
        print(f"{prog}: error: out of space{f' writing {where!r}' if where else ''} ({why}); free space and run "
              "the same command again", file=sys.stderr)
        return EXIT_OUT_OF_SPACE
    except KeyboardInterrupt:
        if is_main_rank():
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
