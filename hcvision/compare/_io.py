"""Atomic file writes for the comparison outputs.

Local stand-in until ``hcvision.io`` (atomic writes for the whole project) lands on main; then these two
functions become imports from there.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

__all__ = ["write_text_atomic", "write_json_atomic"]


def write_text_atomic(text: str, path: Union[str, Path], mode: int | None = None) -> None:
    """Write ``text`` to a temp file next to ``path`` and rename it over ``path`` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(obj: Any, path: Union[str, Path]) -> None:
    """JSON (indented, NaN written as null by the caller's choice of values) via :func:`write_text_atomic`."""
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)
