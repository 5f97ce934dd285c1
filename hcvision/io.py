"""Files and weights, in one place: atomic writes and safe loading (below the models: this module imports none).

- :func:`atomic_write` is the only place that writes a file under a temporary name and renames it into place
  (fsync'd, usual permissions), so a reader or a crash never sees half a file.
- :func:`load_weights` reads ``.safetensors`` with safetensors and every other file with
  ``torch.load(weights_only=True)``, whose restricted unpickler refuses arbitrary objects: untrusted files are
  never unpickled. Wrappers such as timm ``train.py``'s ``{"state_dict", "state_dict_ema", ...}`` or DiT's
  ``{"model", "ema", ...}`` are unwrapped.
- :func:`resolve_weights` maps a run directory, a ``checkpoints/step_*`` directory or a file to one weights file.

Rebuilding a model from a weights file lives next to the models, in :mod:`hcvision.models.loading`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from .cli import OutOfSpaceError, UsageError, out_of_space

__all__ = [
    "PathLike", "failpoint", "atomic_write", "write_bytes", "write_text", "write_json", "save_safetensors",
    "file_sha256", "load_weights", "read_metadata", "unwrap_state_dict", "check_finite", "layout_mismatch",
    "resolve_weights", "find_checkpoints",
]

PathLike = Union[str, os.PathLike]

# Wrapper keys of common training checkpoints: timm train.py, DiT's train.py, plain DDP/EMA wrappers.
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema")
_MODEL_KEYS = ("state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_STEP_RE = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
_FAILPOINT_HITS: Dict[str, int] = {}


def failpoint(name: str, path: Optional[PathLike] = None) -> None:
    """Fault injection for the crash-consistency tests, as databases do it: with ``HCV_FAILPOINT=name:k`` the
    process kills itself (SIGKILL, no clean-up) the k-th time it reaches ``name``; with ``HCV_FAILPOINT=name:k:enospc``
    it raises the ``OSError(ENOSPC)`` a full disk would raise there (about ``path``). Unset, this is a dict lookup."""
    spec = os.environ.get("HCV_FAILPOINT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, mode = rest.partition(":")
    _FAILPOINT_HITS[name] = _FAILPOINT_HITS.get(name, 0) + 1
    if _FAILPOINT_HITS[name] >= int(count or 1):
        if mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it onto ``path``.

    The file is fsync'd before the rename and the directory after it, so after a crash ``path`` holds either the
    old content or the new one. The temporary file is removed if ``write`` fails; a write that failed for want of
    space (ENOSPC, EDQUOT) is an :class:`~hcvision.cli.OutOfSpaceError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if why := out_of_space(err):
            raise OutOfSpaceError(path, why, "nothing was written") from err
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        failpoint("write.before_rename", path)
        os.replace(tmp, path)
    except BaseException as err:
        why = out_of_space(err, path.parent)
        tmp.unlink(missing_ok=True)
        if why:
            raise OutOfSpaceError(path, why) from err
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some file systems do not open directories
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """Save tensors with safetensors (contiguous CPU copies), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (fingerprints weights in results and cached statistics)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def unwrap_state_dict(obj: Any, prefer_ema: bool = False) -> Dict[str, Any]:
    """The weights inside a training checkpoint: EMA weights first when ``prefer_ema``; DDP and
    ``torch.compile`` key prefixes stripped."""
    if isinstance(obj, Mapping):
        order = _EMA_KEYS + _MODEL_KEYS if prefer_ema else _MODEL_KEYS + _EMA_KEYS
        for key in order:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        return obj
    out = {}
    for key, value in obj.items():
        if isinstance(key, str):
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
        out[key] = value
    return out


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file (``{}`` for other formats or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # truncated or foreign file: the caller's load reports it with the file's name
        raise UsageError(f"{what_file(path)} is not a readable safetensors file ({_first_line(err)})") from None


def what_file(path: PathLike, what: str = "weights file") -> str:
    return f"{what} {str(path)!r}"


def load_weights(path: PathLike, what: str = "weights", prefer_ema: bool = False
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Load ``{name: tensor}`` and the file's metadata without executing any pickle.

    ``.safetensors`` go through safetensors; ``.pt``/``.pth``/``.pth.tar``/``.bin`` through
    ``torch.load(weights_only=True)`` (argparse namespaces, which timm's ``train.py`` stores next to the
    weights, are allowed as plain data). Errors are :class:`UsageError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign, or a pickle with forbidden globals
        raise UsageError(
            f"could not load {what} from {str(path)!r} safely ({_first_line(err)}); accepted: a .safetensors file "
            "or a PyTorch checkpoint of plain tensors (.pt/.pth/.pth.tar/.bin)") from None
    state = unwrap_state_dict(obj, prefer_ema=prefer_ema)
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UsageError(f"{what} file {str(path)!r} does not hold a mapping of parameter names to tensors")
    return dict(state), read_metadata(path)


def layout_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], limit: int = 3) -> Optional[str]:
    """The first few tensors of ``state`` whose names or shapes differ from ``expected`` (a state dict, or a mapping
    of names to shapes), as one clause; ``None`` when every name and shape matches."""
    shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in expected.items()}
    wrong = [f"{k} {tuple(v.shape)} vs {shape[k]}" for k, v in state.items()
             if k in shape and tuple(v.shape) != shape[k]]
    missing = [k for k in shape if k not in state]
    unexpected = [k for k in state if k not in shape]
    parts = [f"{label} {', '.join(items[:limit])}{f' (+{len(items) - limit} more)' if len(items) > limit else ''}"
             for label, items in (("first mismatched tensors:", wrong), ("missing:", missing),
                                  ("unexpected:", unexpected)) if items]
    return "; ".join(parts) or None


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or Inf entries, naming the tensors (a diverged run's checkpoint)."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(f"{source} holds NaN or Inf values in {names}; accepted: finite weights "
                         "(the run probably diverged: use an earlier checkpoint)")


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
def find_checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete ``checkpoints/step_*`` directories of a run, oldest first (incomplete ones are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "train_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_weights(path: PathLike, ema: bool = True, key: str = "checkpoint") -> Path:
    """The weights file meant by ``path``: a file as it is; in a run directory ``model_ema.safetensors`` (with
    ``ema``) or ``model.safetensors``; in a ``checkpoints/step_*`` directory ``ema.safetensors`` or
    ``model.safetensors``; in a run without final weights, its latest checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise UsageError(f"{key}={str(p)!r} does not exist; accepted: a run directory, a checkpoints/step_* "
                         "directory, or a weights file (.safetensors, .pt, .pth, .pth.tar)")
    names = ("model_ema.safetensors", "ema.safetensors", "model.safetensors") if ema else ("model.safetensors",)
    for name in names:
        if (p / name).is_file():
            return p / name
    ckpts = find_checkpoints(p)
    if ckpts:
        return resolve_weights(ckpts[-1], ema=ema, key=key)
    present = sorted(q.name for q in p.iterdir() if q.suffix in (".safetensors", ".pt", ".pth", ".bin"))
    raise UsageError(f"{key}={str(p)!r} holds no weights ({', '.join(present) or 'no weights files'}); accepted: "
                     f"a directory with {' or '.join(names)}, or a weights file")
