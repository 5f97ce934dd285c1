"""What a user sees when something is wrong: one error type, one wrapper, used by every entry point.

A foreseeable problem (a wrong path, key, value or image size, a corrupt or foreign checkpoint, a resume that
does not fit) raises :class:`UsageError` with one line naming the bad value and what is accepted; the wrapper
prints ``<prog>: error: <line>`` and exits 2. Anything else is a bug in hcvision and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

__all__ = ["UsageError", "run_cli", "is_main_rank"]


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def is_main_rank() -> bool:
    """True on the process that should print and write (rank 0, or the only process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            prog: Optional[str] = None) -> int:
    """Run ``main(argv)`` and map foreseeable errors to exit codes: 2 for :class:`UsageError`, 130 for Ctrl-C.

    Only rank 0 prints the error line, so a multi-process launch shows it once.
    """
    prog = prog or os.path.basename(sys.argv[0] or "hcvision")
    try:
        return int(main(argv) or 0)
    except UsageError as err:
        if is_main_rank():
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_main_rank():
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
