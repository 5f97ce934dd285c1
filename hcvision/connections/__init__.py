"""Connection library: residual, Hyper-Connections (SHC/DHC), Frac-Connections (SFC/DFC), mHC, mHC-lite and KromHC.

Wrap any Pre-Norm sublayer::

    from hcvision.connections import build_connection, expand_streams, reduce_streams

    conns = [build_connection("dhc", dim=384, rate=2, layer_index=k) for k in range(2 * depth)]
    H = expand_streams(x, "dhc", 2)                     # (B, T, C) -> (B, T, 2, C)
    for k, block in enumerate(sublayers):               # attention, MLP, attention, ...
        H = conns[k](H, block)                          # block: h -> T(h), Pre-Norm inside
    x = reduce_streams(H, "dhc")                        # sum of streams -> final norm

or split the two steps (``h, ctx = conn.width(H)``; ``H = conn.depth(y, ctx)``) when the branch needs extra inputs,
like DiT's gated adaLN branches.

The papers' math is in ``base.py`` / ``hyper.py`` / ``mhc.py`` / ``mhc_exact.py``; the fast paths in ``kernels/``,
chosen once per connection by ``backend`` (``auto``, ``torch``, ``triton``, ``reference``; ``set_backend`` /
``HCV_BACKEND`` for tests and benchmarks). Each kind is one row of the table in ``kinds.py``, registered next to its
class; a new kind is a module calling :func:`~hcvision.connections.kinds.register` and one import line below.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from . import kinds  # noqa: F401  (hcvision.connections.kinds: the table)
from .base import (
    Connection,
    WidthContext,
    check_kind,
    check_rate,
    expand_streams,
    reduce_streams,
    stream_shape,
)
from .duality import parallel_matrices, sequential_matrices

# The kinds, in table order: each module registers its kinds when imported.
from .hyper import HyperConnection, ResidualConnection, hc_init_matrix  # residual, shc, dhc, sfc, dfc
from .kernels import BACKENDS, set_backend
from .kinds import KindRecord, kind_names, kind_record, kind_records
from .mhc import ManifoldConnection, ManifoldHyperConnection, sinkhorn_deepseek, sinkhorn_knopp  # mhc
from .mhc_exact import KromHCConnection, MHCLiteConnection  # mhclite, kromhc

__all__ = [
    "KINDS",
    "HYPER_KINDS",
    "FRAC_KINDS",
    "DYNAMIC_KINDS",
    "KindRecord",
    "kind_record",
    "kind_records",
    "kind_names",
    "Connection",
    "ResidualConnection",
    "HyperConnection",
    "ManifoldConnection",
    "ManifoldHyperConnection",
    "MHCLiteConnection",
    "KromHCConnection",
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
    "sinkhorn_deepseek",
    "sequential_matrices",
    "parallel_matrices",
    "static_connection_parameters",
    "kinds_accepting",
    "set_backend",
    "BACKENDS",
    "extra_parameters",
]


def __getattr__(name: str):
    """``KINDS``, ``HYPER_KINDS``, ``FRAC_KINDS``, ``DYNAMIC_KINDS``: views of the kind table, read when asked for."""
    from . import base

    return getattr(base, name)


def connection_options(kind: str) -> tuple[str, ...]:
    """The keyword options that ``build_connection`` accepts for ``kind``."""
    return kind_record(kind).options


def kinds_accepting(option: str) -> tuple[str, ...]:
    """The kinds whose ``build_connection`` accepts ``option`` (empty for an unknown option)."""
    return tuple(r.name for r in kind_records() if option in r.options)


def _check_options(kind: str, options: dict[str, Any]) -> None:
    """Reject every option ``kind`` does not use, naming the kinds that do (or, if none, every known option)."""
    accepted = kind_record(kind).options
    for name in sorted(set(options) - set(accepted)):
        users = kinds_accepting(name)
        if not users:
            known = sorted(set().union(*(r.options for r in kind_records())))
            raise ValueError(f"unknown connection option {name!r}; accepted: {', '.join(known)}")
        raise ValueError(f"connection option {name!r} does not apply to kind {kind!r}; it is accepted by "
                         f"{', '.join(users)} (options for {kind}: {', '.join(accepted)})")


def build_connection(kind: str, dim: int, rate: int = 1, layer_index: int = 0, **options: Any) -> Connection:
    """Build the connection around sublayer ``layer_index`` of a model of hidden size ``dim``.

    ``rate`` is the expansion rate n for the kinds that copy the hidden state (``shc/dhc/mhc/mhclite/kromhc``) and the
    number of fractions m for ``sfc/dfc``; the residual connection takes 1. An option the kind does not use raises
    ``ValueError`` naming the kinds that use it (:func:`connection_options` lists a kind's options). The kind's
    record (:mod:`.kinds`) says which class builds it.

    ``backend`` (every kind but the residual) picks the implementation once, here: ``"auto"`` (default: Triton on
    CUDA when installed, else the torch Functions), ``"torch"``, ``"triton"`` or ``"reference"`` (the plain math,
    autograd through every op); see :mod:`hcvision.connections.kernels`. Kinds without a fast path (mhclite, kromhc,
    mhc with ``form="deepseek"``) accept ``auto`` and ``reference``. ``fused=False`` is the older spelling of
    ``backend="reference"``. All compute the same function (``tests/test_connections_fast.py``,
    ``tests/test_kernels_triton.py``).

    ``recompute=True`` (every kind; a no-op for the residual connection, which keeps nothing extra) drops the streams
    and the mixing results after forward and recomputes them in backward (HC App. B; mHC Sec. 4.3.2): each sublayer
    keeps its branch output, and the streams are stored once per segment of ``recompute_every`` sublayers (L_r of
    mHC Eq. 20). See :mod:`hcvision.connections.recompute`.
    """
    record = kind_record(kind)
    _check_options(record.name, options)
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
    return record.build(dim, rate, layer_index, **options)


def static_connection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All static connection parameters of ``model`` (the ones the paper trains without weight decay)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, Connection):
            params.extend(module.static_parameters())
    return params


def extra_parameters(kind: str, dim: int, rate: int, norm_params: int | None = None) -> int:
    """Closed-form parameter count of one connection (the kind's record; HC paper Appendix B), used to check models.

    SHC: ``n(n+2)``. DHC: ``|norm| + C(n+2) + n(n+2) + 2``. SFC/DFC replace C by C/m and the two input-row blocks by
    ``m x m`` ones. mHC family: ``nC(2n + R) + 2n + R + 3`` with ``R`` residual logits (mHC ``n^2``, mHC-lite ``n!``,
    KromHC ``2 log2 n``). ``norm_params`` defaults to an affine LayerNorm.
    """
    record = kind_record(kind)
    check_rate(record.name, rate, dim)
    if record.extra_parameters is None:
        raise ValueError(f"connection kind {record.name!r} declares no closed-form parameter count")
    return record.extra_parameters(dim, rate, norm_params)
