"""Shared pieces of every connection kind: names, stream layout, the width/depth contract.

Layout. A hidden state ``h`` of shape ``(..., C)`` becomes a stream tensor ``H`` of shape ``(..., n, c)``:

* ``single`` (residual): ``n = 1, c = C`` (a view, so the baseline runs through the same code);
* ``copies`` (``shc``, ``dhc``, ``mhc``, ``mhclite``, ``kromhc``): ``n`` copies of ``h`` (``c = C``), read out by
  summing the streams;
* ``fractions`` (``sfc``, ``dfc``): ``h`` cut into ``m`` fractions (``n = m, c = C / m``), read out by concatenation.

Each kind declares its layout once, in its :class:`~hcvision.connections.kinds.KindRecord`.

Streams sit next to the channels, so every mixing step is a small contraction over ``n`` that never folds the
stream axis into the batch.

Every connection owns a *width* step (Eqs. 3-4 of Hyper-Connections, arXiv 2409.19606) that mixes the streams into the
branch input and the carried residual streams, and a *depth* step (Eq. 5) that writes the branch output back::

    h_in, ctx = conn.width(H)
    H = conn.depth(branch(h_in), ctx)

``conn(H, branch)`` does both. The connection matrix (Eq. 1) is ``[[0, B], [A_in, A_r]]`` of shape ``(1 + n, k + n)``,
with ``k = 1`` input slot for HC kinds and ``k = m`` for FC kinds (Frac-Connections, arXiv 2503.14125, Sec. 3).

This module and its subclasses hold the math only. The fast paths (custom autograd Functions, Triton kernels, CPU
loops) live in :mod:`hcvision.connections.kernels`; a connection picks one there once, when it is built (``backend``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from . import kernels, kinds
from .context import WidthContext

__all__ = [
    "KINDS",  # noqa: F822  (module __getattr__: computed from the kind table when read)
    "HYPER_KINDS",  # noqa: F822  (module __getattr__: computed from the kind table when read)
    "FRAC_KINDS",  # noqa: F822  (module __getattr__: computed from the kind table when read)
    "DYNAMIC_KINDS",  # noqa: F822  (module __getattr__: computed from the kind table when read)
    "Connection",
    "WidthContext",
    "check_kind",
    "check_rate",
    "expand_streams",
    "reduce_streams",
    "stream_shape",
]

# The kind sets are views of the kind table (:mod:`.kinds`), read when asked for, so a kind registered later is in them.
_DERIVED = {
    "KINDS": lambda: kinds.kind_names(),
    "HYPER_KINDS": lambda: frozenset(r.name for r in kinds.kind_records() if r.copies),  # n copies, summed
    "FRAC_KINDS": lambda: frozenset(r.name for r in kinds.kind_records() if r.fractions),  # m fractions, concatenated
    "DYNAMIC_KINDS": lambda: frozenset(r.name for r in kinds.kind_records() if r.dynamic),  # input-dependent
}


def __getattr__(name: str) -> Any:
    if name in _DERIVED:
        return _DERIVED[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


check_kind = kinds.check_kind


def check_rate(kind: str, rate: int, dim: int | None = None) -> int:
    """Validate the expansion rate ``n`` (streams) or the fraction count ``m`` (fractions) for ``kind``."""
    record = kinds.kind_record(kind)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise ValueError(f"rate must be an integer >= 1 (streams for HC, fractions for FC), got {rate!r}")
    if record.layout == "single" and rate != 1:
        raise ValueError(f"the {record.name} connection has exactly one stream; got rate={rate}, accepted: 1")
    if record.fractions and dim is not None and dim % rate != 0:
        divisors = [d for d in range(1, min(dim, 16) + 1) if dim % d == 0]
        raise ValueError(
            f"{record.name} splits the hidden size into rate={rate} fractions, but dim={dim} is not divisible by "
            f"{rate}; accepted rates for dim={dim} include {divisors}"
        )
    if record.rate_rule is not None:
        record.rate_rule(rate)
    return rate


def stream_shape(kind: str, rate: int, dim: int) -> tuple[int, int]:
    """(number of streams, width of one stream) for a hidden size ``dim``."""
    return kinds.kind_record(kind).stream_shape(check_rate(kind, rate, dim), dim)


def expand_streams(x: torch.Tensor, kind: str, rate: int = 1) -> torch.Tensor:
    """``(..., C) -> (..., n, c)``: n copies (Eq. 14 start: H0 = n copies of h0), m fractions, or the one stream.

    Both are views; the first depth step materialises the streams. A model holding a connection can call
    ``conn.record.expand(x, rate)`` instead and skip the checks.
    """
    return kinds.kind_record(kind).expand(x, check_rate(kind, rate, x.shape[-1]))


def reduce_streams(H: torch.Tensor, kind: str) -> torch.Tensor:
    """``(..., n, c) -> (..., C)``: sum of the copies, concatenation of the fractions, or the one stream."""
    return kinds.kind_record(kind).reduce(H)


class Connection(nn.Module):
    """Base class: one connection around one sublayer (attention or MLP).

    Subclasses implement :meth:`coefficients`, returning the width matrix ``[A_in | A_r]`` of shape ``(n, k + n)``
    (row ``i`` belongs to input stream ``i``) and the output weights ``B`` of shape ``(n,)`` (leading token dimensions
    for dynamic kinds). The generic :meth:`width` / :meth:`depth` apply them.
    """

    kind: str

    def __init__(self, kind: str, dim: int, rate: int, layer_index: int, *, backend: str = "auto",
                 recompute: bool = False, recompute_every: int = 6) -> None:
        super().__init__()
        self.kind = check_kind(kind)
        self.rate = check_rate(self.kind, rate, dim)
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative integer (the sublayer's position), got "
                             f"{layer_index!r}")
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute must be True or False, got {recompute!r}")
        if isinstance(recompute_every, bool) or not isinstance(recompute_every, int) or recompute_every < 1:
            raise ValueError("recompute_every (sublayers per stored segment input, L_r) must be an integer >= 1, "
                             f"got {recompute_every!r}")
        self.dim = dim
        self.layer_index = layer_index
        self.num_streams, self.stream_dim = self.record.stream_shape(rate, dim)
        # Input slots of the branch: one weighted sum for HC, one per fraction for FC.
        self.num_inputs = self.record.num_inputs(rate)
        # The one dispatch point, resolved once: None runs the reference width/depth below.
        self.backend = kernels.check_backend(backend)
        family = self.fast_path_family()
        if family is None and self.backend in ("torch", "triton"):
            raise ValueError(f"connection kind {self.kind!r} has no fast path{self._no_fast_path_reason()}; "
                             f"backend={self.backend!r} is not available, accepted: auto, reference")
        self._impl = None if family is None else kernels.select(family, self.backend)
        #: Recompute the stream mixing in backward instead of keeping the streams (see :mod:`.recompute`);
        #: ``recompute_every`` is the segment length L_r (mHC Eq. 20) in sublayers.
        self.recompute, self.recompute_every = recompute, recompute_every

    @property
    def record(self) -> kinds.KindRecord:
        """The kind's row of the table (:mod:`.kinds`): layout, whether dynamic, fast-path family, names. Looked up,
        not stored, so that a connection pickles without its record's functions."""
        return kinds.kind_record(self.kind)

    @property
    def dynamic(self) -> bool:
        """Whether the coefficients depend on the input (per token)."""
        return self.record.dynamic

    def fast_path_family(self) -> str | None:
        """The :mod:`.kernels` family serving this connection (``None``: the reference path); the record's by
        default."""
        return self.record.family

    def _no_fast_path_reason(self) -> str:
        return ""

    @property
    def fused(self) -> bool:
        """Whether a fast path (not the reference math) runs: ``build_connection(..., fused=False)`` turns it off."""
        return self._impl is not None

    # --- coefficients ---------------------------------------------------------------------------------------
    def coefficients(self, H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def static_parameters(self) -> list[nn.Parameter]:
        """Parameters that get no weight decay (the paper's rule; the models list them in ``no_weight_decay()``)."""
        return []

    # --- the two steps --------------------------------------------------------------------------------------
    def width(self, H: torch.Tensor) -> tuple[torch.Tensor, WidthContext]:
        """Width connection (Eqs. 3-4): branch input ``A_in^T H`` and carried streams ``A_r^T H``."""
        if self._impl is not None:
            return self._impl.width(self, H)
        mix, beta = self.coefficients(H)
        mixed = _mix_streams(H, mix)  # (..., k + n, c): [A_in | A_r]^T H
        h_in = mixed[..., : self.num_inputs, :].flatten(-2)  # HC: the weighted sum; FC: concat of Y^T H
        return h_in, WidthContext(mixed[..., self.num_inputs :, :], beta)

    def depth(self, y: torch.Tensor, ctx: WidthContext) -> torch.Tensor:
        """Depth connection (Eq. 5): ``H_out = B^T y + A_r^T H``; for FC fraction j of y is scaled by ``B_j``."""
        if self._impl is not None:
            return self._impl.depth(self, y, ctx)
        y = y.unflatten(-1, (self.num_inputs, self.stream_dim))
        return ctx.residual + ctx.beta.unsqueeze(-1).to(y.dtype) * y

    def _recompute_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, H: torch.Tensor, branch: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            from .recompute import recompute_forward

            return recompute_forward(self, H, branch, args, kwargs)
        h_in, ctx = self.width(H)
        return self.depth(branch(h_in, *args, **kwargs), ctx)

    # --- analysis -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def matrix(self, H: torch.Tensor | None = None) -> torch.Tensor:
        """The connection matrix ``[[0, B], [A_in, A_r]]`` (Eq. 1), shape ``(..., 1 + n, k + n)``.

        Static kinds ignore ``H``. Dynamic kinds return it per token when ``H`` is given, else the static part
        (the biases the dynamic terms are added to).
        """
        mix, beta = self.coefficients(H) if (H is not None or not self.dynamic) else self.static_coefficients()
        mix = mix.float()
        beta = beta.float()
        lead = torch.broadcast_shapes(mix.shape[:-2], beta.shape[:-1])
        mix = mix.expand(*lead, *mix.shape[-2:])
        beta_row = beta.expand(*lead, beta.shape[-1]).unsqueeze(-2)
        top = torch.cat([mix.new_zeros(*lead, 1, self.num_inputs), beta_row], -1)
        return torch.cat([top, mix], dim=-2)

    def static_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.coefficients(None)

    @classmethod
    def stacked_static_coefficients(cls, conns: list["Connection"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Static ``[A_in | A_r]`` ``(L, n, k+n)`` and ``B`` ``(L, n)`` of several connections of this class, fp32,
        detached (the diagnostics' input; a subclass may batch the work)."""
        pairs = [c.static_coefficients() for c in conns]
        return (torch.stack([m.detach().float() for m, _ in pairs]),
                torch.stack([b.detach().float() for _, b in pairs]))

    def dynamic_scale_parameters(self) -> list[nn.Parameter]:
        """The scalars that scale the token-dependent part (HC's ``s_a, s_b``, mHC's gates ``alpha``); ``[]`` if
        none."""
        return []

    def residual_logits(self) -> torch.Tensor | None:
        """The static logits the residual mix is computed from, ``(groups, logits)`` (mHC: the rows of ``b_res``), or
        ``None`` when the mix is not a normalised exponential (HC/FC). The diagnostics report their spread."""
        return None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dim={self.dim}, rate={self.rate}, layer_index={self.layer_index}"


def _mix_streams(H: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``out[..., j, :] = sum_i mix[..., i, j] * H[..., i, :]``; ``mix`` is ``(n, j)`` or per token ``(..., n, j)``."""
    mix = mix.to(H.dtype)
    if mix.dim() == 2:
        return torch.einsum("...ic,ij->...jc", H, mix)
    return torch.einsum("...ic,...ij->...jc", H, mix)
