"""Shared pieces of every connection kind: names, stream layout, the width/depth contract.

Layout. A hidden state ``h`` of shape ``(..., C)`` becomes a stream tensor ``H`` of shape ``(..., n, c)``:

* residual: ``n = 1, c = C`` (a view, so the baseline runs through the same code);
* hyper-connections (``shc``, ``dhc``, ``mhc``): ``n`` copies of ``h`` (``c = C``), read out by summing the streams;
* frac-connections (``sfc``, ``dfc``): ``h`` cut into ``m`` fractions (``n = m, c = C / m``), read out by concatenation.

Streams sit next to the channels, so every mixing step is a small contraction over ``n`` that never folds the
stream axis into the batch.

Every connection owns a *width* step (Eqs. 3-4 of Hyper-Connections, arXiv 2409.19606) that mixes the streams into the
branch input and the carried residual streams, and a *depth* step (Eq. 5) that writes the branch output back::

    h_in, ctx = conn.width(H)
    H = conn.depth(branch(h_in), ctx)

``conn(H, branch)`` does both. The connection matrix (Eq. 1) is ``[[0, B], [A_in, A_r]]`` of shape ``(1 + n, k + n)``,
with ``k = 1`` input slot for HC kinds and ``k = m`` for FC kinds (Frac-Connections, arXiv 2503.14125, Sec. 3).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from . import _kernels

__all__ = [
    "KINDS",
    "HYPER_KINDS",
    "FRAC_KINDS",
    "DYNAMIC_KINDS",
    "Connection",
    "WidthContext",
    "check_kind",
    "check_rate",
    "expand_streams",
    "reduce_streams",
    "stream_shape",
]

KINDS: tuple[str, ...] = ("residual", "shc", "dhc", "sfc", "dfc", "mhc")
HYPER_KINDS: frozenset[str] = frozenset({"shc", "dhc", "mhc"})  # n copies, summed on read-out
FRAC_KINDS: frozenset[str] = frozenset({"sfc", "dfc"})  # m fractions, concatenated on read-out
DYNAMIC_KINDS: frozenset[str] = frozenset({"dhc", "dfc", "mhc"})  # coefficients depend on the input


def check_kind(kind: str) -> str:
    """Return ``kind`` lower-cased, or raise ``ValueError`` naming the accepted kinds."""
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        close = difflib.get_close_matches(str(kind).lower(), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown connection kind {kind!r}{hint}; accepted: {', '.join(KINDS)}")
    return kind.lower()


def check_rate(kind: str, rate: int, dim: int | None = None) -> int:
    """Validate the expansion rate ``n`` (HC kinds) or the fraction count ``m`` (FC kinds)."""
    kind = check_kind(kind)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise ValueError(f"rate must be an integer >= 1 (streams for HC, fractions for FC), got {rate!r}")
    if kind == "residual" and rate != 1:
        raise ValueError(f"the residual connection has exactly one stream; got rate={rate}, accepted: 1")
    if kind in FRAC_KINDS and dim is not None and dim % rate != 0:
        divisors = [d for d in range(1, min(dim, 16) + 1) if dim % d == 0]
        raise ValueError(
            f"{kind} splits the hidden size into rate={rate} fractions, but dim={dim} is not divisible by {rate}; "
            f"accepted rates for dim={dim} include {divisors}"
        )
    return rate


def stream_shape(kind: str, rate: int, dim: int) -> tuple[int, int]:
    """(number of streams, width of one stream) for a hidden size ``dim``."""
    kind = check_kind(kind)
    rate = check_rate(kind, rate, dim)
    if kind in FRAC_KINDS:
        return rate, dim // rate
    return rate, dim


def expand_streams(x: torch.Tensor, kind: str, rate: int = 1) -> torch.Tensor:
    """``(..., C) -> (..., n, c)``: n copies for HC kinds (Eq. 14 start: H0 = n copies of h0), m fractions for FC.

    Both are views; the first depth step materialises the streams.
    """
    kind = check_kind(kind)
    rate = check_rate(kind, rate, x.shape[-1])
    if kind in FRAC_KINDS:
        return x.unflatten(-1, (rate, x.shape[-1] // rate))
    return x.unsqueeze(-2).expand(*x.shape[:-1], rate, x.shape[-1])


def reduce_streams(H: torch.Tensor, kind: str) -> torch.Tensor:
    """``(..., n, c) -> (..., C)``: sum of the streams for HC kinds, concatenation of the fractions for FC kinds."""
    kind = check_kind(kind)
    if kind in FRAC_KINDS:
        return H.flatten(-2)
    if kind == "residual":
        return H.squeeze(-2)
    return H.sum(dim=-2)


class WidthContext(NamedTuple):
    """What the depth step needs from the width step: the mixed residual streams and the output weights B."""

    residual: torch.Tensor  # (..., n, c)
    beta: torch.Tensor  # (n,) static or (..., n) per token


class Connection(nn.Module):
    """Base class: one connection around one sublayer (attention or MLP).

    Subclasses implement :meth:`coefficients`, returning the width matrix ``[A_in | A_r]`` of shape ``(n, k + n)``
    (row ``i`` belongs to input stream ``i``) and the output weights ``B`` of shape ``(n,)`` (leading token dimensions
    for dynamic kinds). The generic :meth:`width` / :meth:`depth` apply them.
    """

    kind: str
    dynamic: bool = False

    def __init__(self, kind: str, dim: int, rate: int, layer_index: int) -> None:
        super().__init__()
        self.kind = check_kind(kind)
        self.rate = check_rate(self.kind, rate, dim)
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative integer (the sublayer's position), got {layer_index!r}")
        self.dim = dim
        self.layer_index = layer_index
        self.num_streams, self.stream_dim = stream_shape(self.kind, rate, dim)
        # Input slots of the branch: one weighted sum for HC, one per fraction for FC.
        self.num_inputs = self.num_streams if self.kind in FRAC_KINDS else 1

    # --- coefficients ---------------------------------------------------------------------------------------
    def coefficients(self, H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def static_parameters(self) -> list[nn.Parameter]:
        """Parameters that get no weight decay (the paper's rule; see ``param_groups_for_weight_decay``)."""
        return []

    # --- the two steps --------------------------------------------------------------------------------------
    #: Use the fused autograd paths below (same function, fewer passes over the streams); ``False`` runs the plain
    #: reference path. Set per instance by ``build_connection(..., fused=False)``.
    fused: bool = True

    def width(self, H: torch.Tensor) -> tuple[torch.Tensor, WidthContext]:
        """Width connection (Eqs. 3-4): branch input ``A_in^T H`` and carried streams ``A_r^T H``, in one matmul."""
        mix, beta = self.coefficients(H)
        k = self.num_inputs
        if self.fused:
            h_in, residual = stream_mix(H, mix, k)
            return h_in.flatten(-2), WidthContext(residual, beta)
        mixed = _mix_streams(H, mix)
        h_in = mixed[..., :k, :].flatten(-2)  # HC: the weighted sum; FC: concat of Y^T H
        return h_in, WidthContext(mixed[..., k:, :], beta)

    def depth(self, y: torch.Tensor, ctx: WidthContext) -> torch.Tensor:
        """Depth connection (Eq. 5): ``H_out = B^T y + A_r^T H``; for FC fraction j of y is scaled by ``B_j``."""
        y = y.unflatten(-1, (self.num_inputs, self.stream_dim))
        beta = ctx.beta.unsqueeze(-1).to(y.dtype)
        if self.fused and self.num_inputs == 1 and ctx.residual.shape[-2] > 1:
            return hc_depth(ctx.residual, beta, y)
        return torch.addcmul(ctx.residual, beta, y)

    #: Recompute the stream mixing in backward instead of keeping the streams (``build_connection(..., recompute=True)``,
    #: see :mod:`hcvision.connections.recompute`); ``recompute_every`` is the segment length L_r (mHC Eq. 20) in sublayers.
    recompute: bool = False
    recompute_every: int = 6

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
        top = torch.cat([mix.new_zeros(*lead, 1, self.num_inputs), beta.expand(*lead, beta.shape[-1]).unsqueeze(-2)], -1)
        return torch.cat([top, mix], dim=-2)

    def static_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.coefficients(None)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dim={self.dim}, rate={self.rate}, layer_index={self.layer_index}"


def _mix_streams(H: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``out[..., j, :] = sum_i mix[..., i, j] * H[..., i, :]`` for a static ``(n, j)`` or per-token ``(..., n, j)`` mix."""
    mix = mix.to(H.dtype)
    if mix.dim() == 2:
        return torch.einsum("...ic,ij->...jc", H, mix)
    return torch.einsum("...ic,...ij->...jc", H, mix)


# ---------------------------------------------------------------------------------------------------------------
# Fused paths (checked against the plain ones above in tests/test_connections_fast.py)
# ---------------------------------------------------------------------------------------------------------------
def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` over broadcast leading dims, always as one ``bmm``.

    ``torch.matmul`` of a 2-D by a 3-D operand folds the batch into the rows, which for a ``(n, n)`` by ``(M, n, c)``
    product means transposing copies of the big operand; an expanded (stride-0) small operand avoids them.
    """
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if a.dtype != b.dtype:  # backward under autocast: a bf16 incoming gradient meets fp32 saved tensors
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    a3 = _matrix_batch(a.expand(*lead, *a.shape[-2:]))
    b3 = _matrix_batch(b.expand(*lead, *b.shape[-2:]))
    return torch.bmm(a3, b3).view(*lead, a.shape[-2], b.shape[-1])


def _matrix_batch(x: torch.Tensor) -> torch.Tensor:
    """``(..., r, s) -> (N, r, s)`` for ``bmm``: a stride-0 *batch* stays a view (no copy of a static matrix), but a
    stride-0 *matrix* dim (the first layer's expanded streams) is made real, because CPU ``bmm`` falls back to a
    per-item loop with a copy of every item (~50 ms per ViT-S/16 step) for such an operand."""
    x = x.reshape(-1, *x.shape[-2:])
    if x.shape[-2] > 1 and x.stride(-2) == 0:
        x = x.contiguous()
    return x


def _mix_product(H: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``mix^T H`` per token (Eqs. 3-4 in one product): ``(..., J, c)`` from H ``(..., n, c)`` and mix ``(n, J)`` or
    ``(..., n, J)``. The compiled CPU loop when it applies (:mod:`._kernels`), else one ``bmm``."""
    if _kernels.available(H, mix):
        return _kernels.mix_forward(H, mix)
    return _bmm(mix.transpose(-2, -1), H)


def _mix_product_backward(H, mix, g_in, g_res, need_H: bool, need_mix: bool, grad_H: torch.Tensor | None = None):
    """Gradients of :func:`_mix_product` for ``G = [g_in; g_res]``: ``(mix G, H G^T)`` (per token), ``None`` where not
    needed; with ``grad_H`` given, ``mix G`` is added into it in place."""
    if _kernels.available(H, mix):
        return _kernels.mix_backward(H, mix, g_in.to(H.dtype), g_res.to(H.dtype), need_H=need_H, need_mix=need_mix,
                                     grad_H=grad_H)
    G = torch.cat([g_in, g_res], dim=-2)  # (..., k + n, c)
    grad_mix = _bmm(H, G.transpose(-2, -1)) if need_mix else None
    if need_H and grad_H is not None:
        n, c, J = H.shape[-2], H.shape[-1], mix.shape[-1]
        lead = torch.broadcast_shapes(H.shape[:-2], mix.shape[:-2])
        grad_H.view(-1, n, c).baddbmm_(mix.to(grad_H.dtype).expand(*lead, n, J).reshape(-1, n, J),
                                        G.to(grad_H.dtype).reshape(-1, J, c))
    elif need_H:
        grad_H = _bmm(mix, G)
    return grad_H, grad_mix


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a per-token gradient to a (static) input's shape; no-op when the shapes agree."""
    if grad.shape == shape:
        return grad
    return grad.sum_to_size(shape)


class _StreamMix(torch.autograd.Function):
    """``[h_in | R] = mix^T H`` as one batched matmul, streams next to channels.

    Forward: one read of H, one write of ``(k + n) c`` per token (no einsum permutes). Backward: the two
    incoming gradients are stacked once and give ``grad H = mix [g_in; g_R]`` and ``grad mix = H [g_in; g_R]^T`` in one
    matmul each (the plain path instead zero-fills and copies a full buffer per slice, then adds them).
    Saves H and mix only.
    """

    @staticmethod
    def forward(ctx, H: torch.Tensor, mix: torch.Tensor, k: int):
        out = _mix_product(H, mix)  # (..., k + n, c)
        ctx.save_for_backward(H, mix)
        ctx.k = k
        # The branch input gets its own buffer: its first op (a LayerNorm) would copy a strided view in forward and
        # again in backward, and by keeping the view it would keep the whole (k + n) c buffer alive until backward.
        return out[..., :k, :].contiguous(), out[..., k:, :]

    @staticmethod
    def backward(ctx, g_in: torch.Tensor | None, g_res: torch.Tensor | None):
        H, mix = ctx.saved_tensors
        k = ctx.k
        lead = torch.broadcast_shapes(H.shape[:-2], mix.shape[:-2])
        n, c = H.shape[-2], H.shape[-1]
        if g_in is None:
            g_in = H.new_zeros(*lead, k, c)
        if g_res is None:
            g_res = H.new_zeros(*lead, n, c)
        grad_H, grad_mix = _mix_product_backward(H, mix, g_in, g_res, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_H is not None:
            grad_H = _sum_to(grad_H, H.shape).to(H.dtype)
        if grad_mix is not None:
            grad_mix = _sum_to(grad_mix, mix.shape).to(mix.dtype)  # (..., n, k + n)
        return grad_H, grad_mix, None


class _HCDepth(torch.autograd.Function):
    """``H_out = R + B y`` for HC (one branch output y broadcast to n streams, weights B per stream).

    Backward without stream-sized temporaries: ``grad y = B^T G`` and ``grad B = G y`` are small batched matmuls over the
    n axis, where autograd's addcmul backward materialises ``G * B`` and ``G * y`` (each n c per token) and then reduces.
    Saves y and B.
    """

    @staticmethod
    def forward(ctx, residual: torch.Tensor, beta: torch.Tensor, y: torch.Tensor):
        ctx.save_for_backward(beta, y)
        ctx.residual_shape, ctx.residual_dtype = residual.shape, residual.dtype
        return torch.addcmul(residual, beta, y)

    @staticmethod
    def backward(ctx, G: torch.Tensor):
        beta, y = ctx.saved_tensors  # beta (..., n, 1), y (..., 1, c)
        grad_res = grad_beta = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_res = _sum_to(G, ctx.residual_shape).to(ctx.residual_dtype)
        need_beta, need_y = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        beta_g, y_g = beta.to(G.dtype), y.to(G.dtype)  # a bf16 y under autocast meets fp32 streams
        if (need_beta or need_y) and _depth_kernel_applies(G, beta_g, y_g):
            gy, gb = _kernels.depth_backward(G, beta_g, y_g, need_y=need_y, need_beta=need_beta)
            grad_y = None if gy is None else _sum_to(gy, y.shape).to(y.dtype)
            grad_beta = None if gb is None else _sum_to(gb, beta.shape).to(beta.dtype)
            return grad_res, grad_beta, grad_y
        if need_beta:
            grad_beta = _sum_to(_bmm(G, y.transpose(-2, -1)), beta.shape).to(beta.dtype)  # (..., n, 1)
        if need_y:
            grad_y = _sum_to(_bmm(beta.transpose(-2, -1), G), y.shape).to(y.dtype)  # (..., 1, c)
        return grad_res, grad_beta, grad_y


def _depth_kernel_applies(G: torch.Tensor, beta: torch.Tensor, y: torch.Tensor) -> bool:
    """The depth loop needs beta static ``(n, 1)`` or one per token of G, and y one row per token of G."""
    lead = G.shape[:-2]
    return (beta.dim() == 2 or beta.shape[:-2] == lead) and y.shape[:-2] == lead and _kernels.available(G, beta)


def stream_mix(H: torch.Tensor, mix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused width mix: ``(A_in^T H, A_r^T H)`` with ``mix = [A_in | A_r]`` static ``(n, k+n)`` or per token."""
    return _StreamMix.apply(H, mix.to(H.dtype), k)


def hc_depth(residual: torch.Tensor, beta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fused HC depth step ``residual + beta * y`` (``beta`` (..., n, 1), ``y`` (..., 1, c))."""
    return _HCDepth.apply(residual, beta, y)
