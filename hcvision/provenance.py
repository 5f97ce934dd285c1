"""What a run needs to be redone: code version, package versions, interpreter, platform and device.

``run_provenance()`` is cheap (two ``git`` calls at most, no imports of packages that are not already installed) and
never raises: a field it cannot determine is ``None``, so it is safe to call at the start of every run and store in
``results.json``.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["run_provenance", "code_version", "package_versions", "PACKAGES"]

#: Distributions whose versions decide what a run computes (names as pip knows them).
PACKAGES = ("torch", "timm", "accelerate", "diffusers", "torch-fidelity", "numpy", "scipy", "safetensors", "hcvision")

_REPO = Path(__file__).resolve().parents[1]


def _git(args: list, cwd: Path) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(path: Optional[Path] = None) -> Dict[str, Any]:
    """``{"commit", "dirty", "branch", "source"}`` for the checkout holding ``path`` (default: this package).

    ``dirty`` counts tracked changes only: untracked files (run outputs, caches) do not change what the code computes.
    Outside a checkout (an installed wheel) ``commit`` and ``dirty`` are ``None``.
    """
    root = Path(path) if path is not None else _REPO
    top = _git(["rev-parse", "--show-toplevel"], root)
    # An installed package inside someone else's repository (a venv in a project folder) is not that checkout.
    commit = _git(["rev-parse", "HEAD"], root) if top and Path(top).resolve() == root.resolve() else None
    dirty: Optional[bool] = None
    branch: Optional[str] = None
    if commit is not None:
        status = _git(["status", "--porcelain", "--untracked-files=no"], root)
        dirty = bool(status) if status is not None else None
        branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], root)
    return {"commit": commit, "dirty": dirty, "branch": branch, "source": str(root)}


def package_versions(names: tuple = PACKAGES) -> Dict[str, Optional[str]]:
    """Installed version of each distribution in ``names`` (``None`` when it is not installed)."""
    out: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device() -> Dict[str, Any]:
    """The accelerator torch would use (CPU description otherwise); torch is only queried if already imported
    or importable, and a failure to query is recorded rather than raised."""
    info: Dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["type"] = "cuda"
            info["name"] = torch.cuda.get_device_name(0)
            info["count"] = torch.cuda.device_count()
            info["cuda"] = torch.version.cuda
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info["type"] = "mps"
        else:
            info["type"] = "cpu"
    except Exception as e:  # provenance must never break a run
        info["type"] = None
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def run_provenance() -> Dict[str, Any]:
    """Everything besides the config that a run's result depends on (JSON-ready)."""
    return {
        "code": code_version(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": _device(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
