"""Connection library: residual, Hyper-Connections (SHC/DHC), Frac-Connections (SFC/DFC) and mHC.

Wrap any Pre-Norm sublayer::

    from hcvision.connections import build_connection, expand_streams, reduce_streams

    conns = [build_connection("dhc", dim=384, rate=2, layer_index=k) for k in range(2 * depth)]
    H = expand_streams(x, "dhc", 2)                     # (B, T, C) -> (B, T, 2, C)
    for k, block in enumerate(sublayers):               # attention, MLP, attention, ...
        H = conns[k](H, block)                          # block: h -> T(h), Pre-Norm inside
    x = reduce_streams(H, "dhc")                        # sum of streams -> final norm

or split the two steps (``h, ctx = conn.width(H)``; ``H = conn.depth(y, ctx)``) when the branch needs extra inputs,
like DiT's gated adaLN branches.

The papers' math is in ``base.py`` / ``hyper.py`` / ``mhc.py``; the fast paths in ``kernels/``, chosen once per
connection by ``backend`` (``auto``, ``torch``, ``triton``, ``reference``; ``set_backend`` / ``HCV_BACKEND`` for tests
and benchmarks).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import (
    DYNAMIC_KINDS,
    FRAC_KINDS,
    HYPER_KINDS,
    KINDS,
    Connection,
    WidthContext,
    check_kind,
    check_rate,
    expand_streams,
    reduce_streams,
    stream_shape,
)
from .duality import parallel_matrices, sequential_matrices
from .hyper import HyperConnection, ResidualConnection, hc_init_matrix
from .kernels import BACKENDS, set_backend
from .mhc import ManifoldHyperConnection, sinkhorn_knopp

__all__ = [
    "KINDS",
    "HYPER_KINDS",
    "FRAC_KINDS",
    "DYNAMIC_KINDS",
    "Connection",
    "ResidualConnection",
    "HyperConnection",
    "ManifoldHyperConnection",
    "WidthContext",
    "build_connection",
    "connection_options",
    "expand_streams",
    "reduce_streams",
    "stream_shape",
    "check_kind",
    "check_rate",
    "hc_init_matrix",
    "sinkhorn_knopp",
    "sequential_matrices",
    "parallel_matrices",
    "static_connection_parameters",
    "kinds_accepting",
    "set_backend",
    "BACKENDS",
    "extra_parameters",
]

_COMMON = ("recompute", "recompute_every")
_FAST = ("backend", "fused")
_DYNAMIC_HC = ("tanh", "scale_init", "norm", "norm_affine", "norm_eps")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "residual": _COMMON,
    "shc": _FAST + _COMMON,
    "sfc": _FAST + _COMMON,
    "dhc": _DYNAMIC_HC + _FAST + _COMMON,
    "dfc": _DYNAMIC_HC + _FAST + _COMMON,
    "mhc": ("gate_init", "sinkhorn_iters", "res_init_diag", "norm_eps") + _FAST + _COMMON,
}


def connection_options(kind: str) -> tuple[str, ...]:
    """The keyword options that ``build_connection`` accepts for ``kind``."""
    return _OPTIONS[check_kind(kind)]


def kinds_accepting(option: str) -> tuple[str, ...]:
    """The kinds whose ``build_connection`` accepts ``option`` (empty for an unknown option)."""
    return tuple(kind for kind in KINDS if option in _OPTIONS[kind])


def _check_options(kind: str, options: dict[str, Any]) -> None:
    """Reject every option ``kind`` does not use, naming the kinds that do (or, if none, every known option)."""
    for name in sorted(set(options) - set(_OPTIONS[kind])):
        users = kinds_accepting(name)
        if not users:
            known = sorted(set().union(*_OPTIONS.values()))
            raise ValueError(f"unknown connection option {name!r}; accepted: {', '.join(known)}")
        raise ValueError(f"connection option {name!r} does not apply to kind {kind!r}; it is accepted by "
                         f"{', '.join(users)} (options for {kind}: {', '.join(_OPTIONS[kind])})")


def build_connection(kind: str, dim: int, rate: int = 1, layer_index: int = 0, **options: Any) -> Connection:
    """Build the connection around sublayer ``layer_index`` of a model of hidden size ``dim``.

    ``rate`` is the expansion rate n for ``shc/dhc/mhc`` and the number of fractions m for ``sfc/dfc``; the residual
    connection takes 1. An option the kind does not use raises ``ValueError`` naming the kinds that use it
    (:func:`connection_options` lists a kind's options).

    ``backend`` (every kind but the residual, which has no fast path) picks the implementation once, here:
    ``"auto"`` (default: Triton on CUDA when installed, else the torch Functions), ``"torch"``, ``"triton"`` or
    ``"reference"`` (the plain math, autograd through every op); see :mod:`hcvision.connections.kernels`.
    ``fused=False`` is the older spelling of ``backend="reference"``. All compute the same function
    (``tests/test_connections_fast.py``, ``tests/test_kernels_triton.py``).

    ``recompute=True`` (every kind; a no-op for the residual connection, which keeps nothing extra) drops the streams
    and the mixing results after forward and recomputes them in backward (HC App. B; mHC Sec. 4.3.2): each sublayer
    keeps its branch output, and the streams are stored once per segment of ``recompute_every`` sublayers (L_r of
    mHC Eq. 20). See :mod:`hcvision.connections.recompute`.
    """
    kind = check_kind(kind)
    _check_options(kind, options)
    options = dict(options)
    if "fused" in options:
        fused = options.pop("fused")
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        if not fused:
            if options.get("backend", "reference") != "reference":
                raise ValueError(f"fused=False means backend='reference'; it contradicts "
                                 f"backend={options['backend']!r}")
            options["backend"] = "reference"
    if kind == "residual":
        return ResidualConnection(dim, rate, layer_index, **options)
    if kind == "mhc":
        return ManifoldHyperConnection(dim, rate, layer_index, **options)
    return HyperConnection(kind, dim, rate, layer_index, **options)


def static_connection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All static connection parameters of ``model`` (the ones the paper trains without weight decay)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, Connection):
            params.extend(module.static_parameters())
    return params


def extra_parameters(kind: str, dim: int, rate: int, norm_params: int | None = None) -> int:
    """Closed-form parameter count of one connection (HC paper, Appendix B), used to check models.

    SHC: ``n(n+2)``. DHC: ``|norm| + C(n+2) + n(n+2) + 2``. SFC/DFC replace C by C/m and the two input-row blocks by
    ``m x m`` ones. mHC: ``nC(2n + n^2) + 2n + n^2 + 3``. ``norm_params`` defaults to an affine LayerNorm.
    """
    kind = check_kind(kind)
    n, c = stream_shape(kind, rate, dim)
    k = n if kind in FRAC_KINDS else 1
    static = n * (k + n) + n
    if norm_params is None:
        norm_params = 2 * c
    if kind == "residual":
        return 0
    if kind in ("shc", "sfc"):
        return static
    if kind in ("dhc", "dfc"):
        return norm_params + c * (k + n + 1) + static + 2
    return n * dim * (2 * n + n * n) + 2 * n + n * n + 3
