"""mHC's coefficient path (Eqs. 7-9) token-last, with analytic backwards, for the ``torch`` backend.

Same function as :meth:`hcvision.connections.mhc.ManifoldHyperConnection.coefficients`, cheaper on CPU:

* the coefficients are computed token-last, ``(2n + n^2, tokens)``: every op on them (gates, sigmoid, the Sinkhorn
  sums and divisions over ``n``) then runs over contiguous rows of tokens instead of over tiny ``n``-sized inner dims;
* the projection with its RMS normalisation (Eq. 7) is one Function with an explicit backward (:class:`_RMSProjection`);
* Sinkhorn-Knopp (Eq. 9) is one Function (:class:`_SinkhornKnopp`) whose backward is the exact derivative of the
  unrolled iterations (not an implicit-function approximation).

Both Functions are first-order only (double backward raises; the reference path supports it).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..context import WidthContext
from .functions import stream_mix
from .torch_prims import Primitives

__all__ = ["sinkhorn_knopp_fused", "mhc_coefficients", "mhc_width"]


def _lse(L: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum_dim exp(L)`` with the max shift (finite for any finite ``L``)."""
    mx = L.amax(dim=dim, keepdim=True)
    return (L - mx).exp_().sum(dim=dim, keepdim=True).log_().add_(mx)


class _SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn-Knopp (mHC Eq. 9) with the matrix axes first: ``logits`` is ``(n, n, *batch)``, row ``i``, column ``j``.

    Same iterations as :func:`hcvision.connections.mhc.sinkhorn_knopp` (column-normalise, then row-normalise,
    ``iters`` times, of ``exp(logits)``). Batch axes last so that the sums over ``n`` run over contiguous rows.

    Forward runs in the linear domain (two sums and two divisions per iteration) from ``exp(logits - column max)``
    (the first column normalisation cancels any per-column factor). When some row or column sum falls below
    ``sqrt(tiny)`` (logit spreads beyond ~40 in fp32, where a whole row can underflow and the next division gives NaN:
    issue 13), it reruns in the log domain (``L <- L - logsumexp(L)``), which is finite for any finite input.

    Backward is the exact derivative of the unrolled iterations, carried in the log domain: with ``G = grad_M * M``
    (the gradient with respect to ``log M``), a normalisation ``out = m / s`` has ``G_m = G_out - out * sum(G_out)``.
    The iterates are rebuilt from the output in reverse from the saved normalisers (linear: ``M_{t-1/2} = M_t r_t``;
    log: ``L_{t-1/2} = L_t + log r_t``); they differ from forward's by rounding only.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, log_domain: bool | None = None) -> torch.Tensor:
        if log_domain is None and torch.compiler.is_compiling():
            log_domain = True  # no data-dependent branch (a host sync) inside a compiled graph
        m = torch.exp(logits - logits.amax(dim=0, keepdim=True)) if not log_domain else logits
        if not log_domain:
            cols, rows = [], []
            for _ in range(iters):  # in place: nothing of forward is kept but the sums
                c = m.sum(dim=0, keepdim=True)
                m.div_(c)
                r = m.sum(dim=1, keepdim=True)
                m.div_(r)
                cols.append(c)
                rows.append(r)
            cols_t, rows_t = torch.stack(cols), torch.stack(rows)
            floor = torch.finfo(m.dtype).tiny ** 0.5
            # log_domain None decides by the sums (one host sync); True / False force a path (tests). NaN, after a
            # zero sum was divided by, compares False: also the log path.
            if log_domain is None:
                log_domain = not bool(torch.minimum(cols_t.amin(), rows_t.amin()) >= floor)
        ctx.log_domain = bool(log_domain)
        if ctx.log_domain:
            L = logits.clone()
            cols, rows = [], []
            for _ in range(iters):
                c = _lse(L, 0)
                L.sub_(c)
                r = _lse(L, 1)
                L.sub_(r)
                cols.append(c)
                rows.append(r)
            m = L.exp()
            ctx.save_for_backward(L, torch.stack(cols), torch.stack(rows))
        else:
            ctx.save_for_backward(m, cols_t, rows_t)
        return m

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        out, cols, rows = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            grad = grad.to(out.dtype).contiguous()  # batch-last contiguous: the in-place updates below stay cheap
            if ctx.log_domain:
                L = out.clone()
                G = grad * L.exp()
                for t in reversed(range(cols.shape[0])):
                    G.addcmul_(L.exp(), G.sum(dim=1, keepdim=True), value=-1.0)  # through the row normalisation
                    L.add_(rows[t])  # L_{t-1/2}
                    G.addcmul_(L.exp(), G.sum(dim=0, keepdim=True), value=-1.0)  # through the column normalisation
                    L.add_(cols[t])  # L_{t-1}
                return G, None, None
            G = grad * out
            m = out.clone()  # M_t, rebuilt backwards
            for t in reversed(range(cols.shape[0])):
                G.addcmul_(m, G.sum(dim=1, keepdim=True), value=-1.0)  # through the row normalisation: M_t
                m.mul_(rows[t])  # M_{t-1/2}
                G.addcmul_(m, G.sum(dim=0, keepdim=True), value=-1.0)  # through the column normalisation
                if t:
                    m.mul_(cols[t])  # M_{t-1}
            return G, None, None


def sinkhorn_knopp_fused(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """:func:`~hcvision.connections.mhc.sinkhorn_knopp` (same signature, ``(..., n, n)``) through the Function above."""
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    out = _SinkhornKnopp.apply(logits.movedim((-2, -1), (0, 1)).contiguous(), int(iters))
    return out.movedim((0, 1), (-2, -1))


class _RMSProjection(torch.autograd.Function):
    """``RMSNorm(x) phi`` (mHC Eq. 7, no affine), token-last: returns ``(phi^T x^T) * rstd`` of shape ``(K, tokens)``.

    ``H`` is ``(..., n, C)``, flattened to ``x = vec(H)`` of ``(tokens, D = n C)``; ``phi`` is ``(D, K)``. The
    normalisation is applied after the matmul (``rstd`` is a per-token scalar), so no normalised copy of ``x`` exists.
    Computed in ``promote(H.dtype, fp32)``; gradients are returned in the inputs' dtypes.

    The matmuls are skinny (``K = 2n + n^2`` columns against ``D`` in the thousands) and their orientation matters for
    BLAS on CPU: forward is ``phi^T @ x^T``, ``grad phi^T = g' @ x``, ``grad x = g'^T @ phi^T`` with ``g' = g * rstd``.
    With ``y = phi^T x^T`` and ``rstd = (|x|^2 / D + eps)^-1/2``, ``grad x = g'^T phi^T - (sum_k g y) rstd^3 / D * x``;
    the second term is written first and the matmul accumulates into it (``addmm_``).

    Saves ``H`` (the width mix keeps it anyway), ``phi``, ``y`` and ``rstd``.
    """

    @staticmethod
    def forward(ctx, H: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = torch.promote_types(H.dtype, torch.float32)
        x = H.reshape(-1, H.shape[-2] * H.shape[-1]).to(dtype)
        y = torch.mm(phi.to(dtype).t(), x.t())  # (K, tokens); BLAS reads the transposed operands in place
        # vector_norm reads x once, without the full-size temporary of x.pow(2).mean()
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1).square() / x.shape[-1] + eps)  # (tokens,)
        ctx.save_for_backward(H, phi, y, rstd)
        return y * rstd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        H, phi, y, rstd = ctx.saved_tensors
        grad_H = grad_phi = None
        with torch.autocast(device_type=grad.device.type, enabled=False):
            grad = grad.to(y.dtype)
            x = H.reshape(-1, H.shape[-2] * H.shape[-1]).to(y.dtype)
            g = (grad * rstd).contiguous()  # (K, tokens)
            if ctx.needs_input_grad[0]:
                coef = (grad * y).sum(dim=0) * rstd.pow(3) / (-x.shape[-1])  # (tokens,)
                grad_x = x * coef.unsqueeze(-1)
                grad_x.addmm_(g.t(), phi.to(y.dtype).t())
                grad_H = grad_x.view(H.shape).to(H.dtype)
            if ctx.needs_input_grad[1]:
                grad_phi = torch.mm(g, x).t().to(phi.dtype)  # (D, K)
        return grad_H, grad_phi, None


def mhc_coefficients(conn, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 7-9 token-last: ``([H_pre^T | H_res^T] (..., n, 1 + n), H_post (..., n))``, fp32 or better."""
    n = conn.num_streams
    lead = H.shape[:-2]
    dtype = torch.promote_types(H.dtype, torch.float32)  # fp32 at least, also under autocast
    with torch.autocast(device_type=H.device.type, enabled=False):
        proj = _RMSProjection.apply(H, conn.phi, conn.norm_eps)  # (2n + n^2, tokens) = (RMSNorm(x) phi)^T
        # [a_pre (n) | a_post (n) | a_res (n^2)] and [b_pre | b_post | vec(b_res)], one column per logit
        gate = torch.cat([conn.gate_pre.expand(n), conn.gate_post.expand(n), conn.gate_res.expand(n * n)])
        bias = torch.cat([conn.bias_pre, conn.bias_post, conn.bias_res.flatten()])
        logits = torch.addcmul(bias.to(dtype).unsqueeze(-1), gate.to(dtype).unsqueeze(-1), proj)
        gates = torch.sigmoid(logits[: 2 * n])  # (2n, tokens): H_pre, H_post / 2
        res = logits[2 * n :].view(n, n, proj.shape[-1])  # (n, n, tokens), row-major vec(H~_res) per token
        h_res = _SinkhornKnopp.apply(res, conn.sinkhorn_iters)
        # [A_m | A_r] = [H_pre^T | H_res^T]: row i holds H_pre[i] and column i of H_res
        mix = torch.cat([gates[:n].unsqueeze(1), h_res.transpose(0, 1)], dim=1)  # (n, 1 + n, tokens)
        mix = mix.permute(2, 0, 1).contiguous().view(*lead, n, n + 1)
        h_post = (2.0 * gates[n:]).t().contiguous().view(*lead, n)
        return mix, h_post


def mhc_width(conn, H: torch.Tensor, prims: Primitives):
    """mHC width step: coefficients (Eqs. 7-9) then the fused mix (Eqs. 3-4 with ``A_m = H_pre^T, A_r = H_res^T``)."""
    mix, h_post = mhc_coefficients(conn, H)
    h_in, residual = stream_mix(H, mix, 1, prims)
    return h_in.flatten(-2), WidthContext(residual, h_post)
