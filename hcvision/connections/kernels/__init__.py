"""The one dispatch point for the connections' fast paths.

A connection chooses its implementation once, when it is built (``build_connection(..., backend=...)``):

* ``reference``: the plain autograd math of :mod:`hcvision.connections.base`, ``hyper`` and ``mhc`` (the papers'
  equations; every fast path is tested against it);
* ``torch``: custom autograd Functions with hand-written backwards (:mod:`.functions`, :mod:`.mhc_torch`) over torch
  primitives (:mod:`.torch_prims`; on CPU optionally the compiled loops of :mod:`.cpu_loops`);
* ``triton``: the same Functions over Triton kernels (:mod:`.triton_ops`), plus a fused mHC coefficient kernel;
  CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests);
* ``auto`` (default): ``triton`` for CUDA tensors when Triton is installed, else ``torch``.

``set_backend(name)`` or the environment variable ``HCV_BACKEND`` turn ``auto`` into a fixed backend (for tests and
benchmarks); an explicit constructor argument wins over both. The kind is resolved once: :func:`select` returns the
implementation of one family (static, dynamic or mHC), which the connection keeps.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["BACKENDS", "Implementation", "set_backend", "forced_backend", "check_backend", "select",
           "triton_available"]

BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")
FAMILIES: tuple[str, ...] = ("static", "dynamic", "mhc")

_forced: str | None = None


def check_backend(name: str) -> str:
    """Return ``name`` lower-cased, or raise ``ValueError`` naming the accepted backends."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown connection backend {name!r}; accepted: {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Make ``backend="auto"`` mean ``name`` for connections built from now on (``None`` restores the default)."""
    global _forced
    _forced = None if name is None else check_backend(name)


def forced_backend() -> str | None:
    """What ``auto`` resolves to by :func:`set_backend` or ``HCV_BACKEND`` (``None``: by device)."""
    if _forced is not None:
        return _forced
    env = os.environ.get("HCV_BACKEND", "").strip()
    return check_backend(env) if env else None


def triton_available() -> bool:
    """Whether the triton package is installed (a GPU is not required: the interpreter runs on CPU).

    Found without importing it: Triton reads ``TRITON_INTERPRET`` when the kernels are defined, so building a
    connection must not be what first imports them.
    """
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Implementation:
    """One backend's width and depth steps for one family of kinds (stateless apart from the two names; picklable)."""

    def __init__(self, backend: str, family: str) -> None:
        self.name, self.family = backend, family

    def width(self, conn, H: torch.Tensor):
        raise NotImplementedError

    def depth(self, conn, y: torch.Tensor, ctx):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family!r})"


class TorchImplementation(Implementation):
    """Custom autograd Functions over torch primitives (:mod:`.functions`, :mod:`.mhc_torch`)."""

    def __init__(self, family: str) -> None:
        super().__init__("torch", family)

    def width(self, conn, H):
        from . import functions, mhc_torch
        from .torch_prims import TORCH

        if self.family == "mhc":
            return mhc_torch.mhc_width(conn, H, TORCH)
        fn = functions.static_width if self.family == "static" else functions.dynamic_width
        return fn(conn, H, TORCH)

    def depth(self, conn, y, ctx):
        from . import functions
        from .torch_prims import TORCH

        return functions.depth(conn, y, ctx, TORCH)


class TritonImplementation(Implementation):
    """The same Functions over Triton kernels (:mod:`.triton_ops`) and a fused mHC coefficient kernel."""

    def __init__(self, family: str) -> None:
        super().__init__("triton", family)

    def width(self, conn, H):
        from . import functions, triton_ops

        if H.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got {H.device.type}), or TRITON_INTERPRET=1 "
                               "set before triton is imported; use backend='torch' or 'auto' on CPU")
        if self.family == "mhc":
            return triton_ops.mhc_width(conn, H, triton_ops.TRITON)
        fn = functions.static_width if self.family == "static" else functions.dynamic_width
        return fn(conn, H, triton_ops.TRITON)

    def depth(self, conn, y, ctx):
        from . import functions, triton_ops

        return functions.depth(conn, y, ctx, triton_ops.TRITON)


class AutoImplementation(Implementation):
    """``triton`` for CUDA tensors when Triton imports, else ``torch``: a device check per call, nothing more."""

    def __init__(self, family: str) -> None:
        super().__init__("auto", family)
        self.cpu = TorchImplementation(family)
        self.gpu = TritonImplementation(family) if triton_available() else self.cpu

    def width(self, conn, H):
        return (self.gpu if H.is_cuda else self.cpu).width(conn, H)

    def depth(self, conn, y, ctx):
        return (self.gpu if y.is_cuda else self.cpu).depth(conn, y, ctx)


_CACHE: dict[tuple[str, str], Implementation] = {}


def select(family: str, backend: str = "auto") -> Implementation | None:
    """The implementation of ``family`` (``static``: shc/sfc, ``dynamic``: dhc/dfc, ``mhc``) for ``backend``.

    ``None`` means the reference path. Called once per connection, at construction.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown connection family {family!r}; accepted: {', '.join(FAMILIES)}")
    backend = check_backend(backend)
    if backend == "auto":
        backend = forced_backend() or "auto"
    if backend == "reference":
        return None
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton); accepted without it: "
                         "auto, reference, torch")
    key = (family, backend)
    if key not in _CACHE:
        _CACHE[key] = {"torch": TorchImplementation, "triton": TritonImplementation,
                       "auto": AutoImplementation}[backend](family)
    return _CACHE[key]
