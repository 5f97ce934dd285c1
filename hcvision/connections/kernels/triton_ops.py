"""The ``triton`` backend: the :class:`~.torch_prims.Primitives` bundle as Triton kernels (:mod:`.triton_kernels`),
and mHC's whole coefficient path (Eqs. 7-9) as one autograd Function over two kernels.

Inputs may be fp32 or bf16 (streams, branch outputs); accumulation and the coefficients are fp32. Gradients of the
small per-token coefficient tensors are reduced over tokens with torch ops (they are ``O(n^2)`` per token, not
stream-sized). Checked against the reference path under ``TRITON_INTERPRET=1`` (``tests/test_kernels_triton.py``).
"""
from __future__ import annotations

import torch
import triton

from ..context import WidthContext
from . import triton_kernels as K
from .functions import stream_mix
from .torch_prims import Primitives

__all__ = ["TRITON", "mhc_width", "mhc_coefficients"]


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _block(c: int) -> int:
    return min(128, _p2(c))


def _tokens(x: torch.Tensor, lead: torch.Size, rows: int, cols: int) -> torch.Tensor:
    """``x`` broadcast to ``(*lead, rows, cols)`` and made contiguous as ``(tokens, rows, cols)``."""
    return x.expand(*lead, rows, cols).reshape(-1, rows, cols).contiguous()


def _coeffs(m: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, int]:
    """A static ``(n, J)`` matrix (token stride 0) or a per-token one broadcast to ``lead``."""
    if m.dim() == 2:
        return m.contiguous(), 0
    n, J = m.shape[-2:]
    return _tokens(m, lead, n, J), n * J


def mix(H: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``out[..., j, :] = sum_i m[..., i, j] H[..., i, :]`` (HC Eqs. 3-4)."""
    lead = torch.broadcast_shapes(H.shape[:-2], m.shape[:-2])
    n, c = H.shape[-2:]
    J = m.shape[-1]
    Hc = _tokens(H, lead, n, c)
    mc, stride = _coeffs(m.to(H.dtype), lead)
    out = torch.empty(Hc.shape[0], J, c, dtype=H.dtype, device=H.device)
    if out.numel():
        K.mix_fwd[(Hc.shape[0],)](Hc, mc, out, c, stride, N=n, J=J, NP=_p2(n), JP=_p2(J), BC=_block(c))
    return out.view(*lead, J, c)


def mix_backward(H, m, g_in, g_res, need_H: bool, need_mix: bool, grad_H: torch.Tensor | None = None):
    """``(m G, H G^T)`` for ``G = [g_in; g_res]``, the second per token; with ``grad_H`` the first is added into it."""
    lead = torch.broadcast_shapes(H.shape[:-2], m.shape[:-2])
    n, c = H.shape[-2:]
    k = g_in.shape[-2]
    Hc = _tokens(H, lead, n, c)
    mc, stride = _coeffs(m.to(H.dtype), lead)
    gi, gr = _tokens(g_in.to(H.dtype), lead, k, c), _tokens(g_res.to(H.dtype), lead, n, c)
    T = Hc.shape[0]
    accum = grad_H is not None
    if need_H and grad_H is None:
        grad_H = torch.empty(*lead, n, c, dtype=H.dtype, device=H.device)
    gh = grad_H.view(T, n, c) if need_H else Hc  # (a dummy pointer when not needed)
    gm = torch.empty(T, n, k + n, dtype=torch.float32, device=H.device) if need_mix else Hc
    if T and (need_H or need_mix):
        K.mix_bwd[(T,)](Hc, mc, gi, gr, gh, gm, c, stride, N=n, K=k, NP=_p2(n), JP=_p2(k + n), BC=_block(c),
                        NEED_H=need_H, NEED_M=need_mix, ACCUM=accum)
    return (grad_H if need_H else None), (gm.view(*lead, n, k + n).to(H.dtype) if need_mix else None)


def _depth_operands(G_or_R: torch.Tensor, beta: torch.Tensor, y: torch.Tensor):
    lead = G_or_R.shape[:-2]
    n, c = G_or_R.shape[-2:]
    k = y.shape[-2]
    b, stride = (beta.reshape(n).contiguous(), 0) if beta.dim() == 2 else (_tokens(beta, lead, n, 1), n)
    return lead, n, c, k, b, stride, _tokens(y, lead, k, c)


def depth_forward(residual: torch.Tensor, beta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``R + B y`` (Eq. 5) in one pass: streams read once, written once."""
    dtype = torch.promote_types(torch.promote_types(residual.dtype, beta.dtype), y.dtype)
    lead, n, c, k, b, stride, yc = _depth_operands(residual, beta, y)
    R = residual.reshape(-1, n, c).contiguous()
    out = torch.empty(*lead, n, c, dtype=dtype, device=residual.device)
    if out.numel():
        K.depth_fwd[(R.shape[0],)](R, b, yc, out, c, stride, N=n, K=k, NP=_p2(n), BC=_block(c))
    return out


def depth_backward(G: torch.Tensor, beta: torch.Tensor, y: torch.Tensor, need_y: bool, need_beta: bool):
    """``grad y`` (``(..., k, c)``) and the per-token ``grad B`` (``(..., n, 1)``) in one pass over ``G``."""
    lead, n, c, k, b, stride, yc = _depth_operands(G, beta, y)
    Gc = G.reshape(-1, n, c).contiguous()
    T = Gc.shape[0]
    gy = torch.empty(*lead, k, c, dtype=G.dtype, device=G.device) if need_y else Gc
    gb = torch.empty(*lead, n, 1, dtype=torch.float32, device=G.device) if need_beta else Gc
    if T:
        K.depth_bwd[(T,)](Gc, b, yc, gy, gb, c, stride, N=n, K=k, NP=_p2(n), BC=_block(c), NEED_Y=need_y,
                          NEED_B=need_beta)
    return (gy if need_y else None), (gb.to(G.dtype) if need_beta else None)


def normed_linear_forward(x: torch.Tensor, weight: torch.Tensor, center: bool, eps: float | None):
    """``p = rstd (x W^T - mu s^T)`` over rows of ``x`` (``s = W 1``); fp32 statistics and accumulation."""
    D = x.shape[-1]
    xf = x.reshape(-1, D).contiguous()
    W = weight.contiguous()
    J = W.shape[0]
    rows = xf.shape[0]
    proj = torch.empty(rows, J, dtype=torch.float32, device=x.device)
    norm = eps is not None
    mean = torch.empty(rows, dtype=torch.float32, device=x.device) if norm and center else None
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if norm else None
    wsum = W.float().sum(-1) if center else proj
    if rows:
        K.normed_proj_fwd[(rows,)](xf, W, wsum, proj, proj if mean is None else mean, proj if rstd is None else rstd,
                                   D, 0.0 if eps is None else float(eps), J=J, JP=_p2(J), BD=_block(D), NORM=norm,
                                   CENTER=bool(center and norm))
    return proj.to(x.dtype), (xf, W, mean, rstd, proj)


def normed_linear_backward(saved: tuple, grad_proj: torch.Tensor, need_x: bool, need_weight: bool,
                           grad_x_into: torch.Tensor | None = None):
    """Gradients of :func:`normed_linear_forward`: ``grad x`` by one kernel pass, ``grad W = g_u^T x`` by one matmul."""
    xf, W, mean, rstd, proj = saved
    rows, D = xf.shape
    J = W.shape[0]
    g = grad_proj.reshape(rows, J).float().contiguous()
    gu = torch.empty(rows, J, dtype=torch.float32, device=xf.device)
    accum = grad_x_into is not None
    gx = grad_x_into if accum else (torch.empty_like(xf) if need_x else xf)
    if accum:
        assert gx.is_contiguous()
    norm, center = rstd is not None, mean is not None
    wsum = W.float().sum(-1) if center else g
    if rows:
        K.normed_proj_bwd[(rows,)](xf, W, wsum, g, proj, g if mean is None else mean, g if rstd is None else rstd, gx,
                                   gu, D, J=J, JP=_p2(J), BD=_block(D), NORM=norm, CENTER=center, NEED_X=need_x,
                                   ACCUM=accum)
    grad_w = None
    if need_weight:
        grad_w = torch.mm(gu.t(), xf.float())  # (J, D)
        if center:  # through s = W 1 in the centring term
            grad_w.sub_((gu * mean.unsqueeze(-1)).sum(0).unsqueeze(-1))
        grad_w = grad_w.to(W.dtype)
    return (gx if need_x else None), grad_w


TRITON = Primitives("triton", mix, mix_backward, depth_forward, depth_backward, normed_linear_forward,
                    normed_linear_backward)


class _MHCCoefficients(torch.autograd.Function):
    """mHC Eqs. 7-9 for every token: ``x~ = RMSNorm(vec(H))``, ``p = x~ phi``, gates, sigmoids and Sinkhorn-Knopp.

    Forward: one pass over ``vec(H)`` for ``p`` and ``rstd`` (:func:`~.triton_kernels.normed_proj_fwd`), one kernel
    for the per-token coefficients (:func:`~.triton_kernels.mhc_coeff_fwd`). Backward: the coefficient kernel's
    backward gives the logits' gradient, then one pass over ``vec(H)`` for ``grad H`` and one matmul for ``grad phi``.
    Saves ``H``, ``p``, ``rstd``, the coefficients and the Sinkhorn normalisers (``2 n`` per iteration and token).
    """

    @staticmethod
    def forward(ctx, H, phi, gate_pre, gate_post, gate_res, bias_pre, bias_post, bias_res, iters: int, eps: float):
        n = H.shape[-2]
        lead = H.shape[:-2]
        with torch.autocast(device_type=H.device.type, enabled=False):
            _, (xf, W, _, rstd, p) = normed_linear_forward(H.reshape(-1, n * H.shape[-1]), phi.t(), False, eps)
            gate = torch.cat([gate_pre.expand(n), gate_post.expand(n), gate_res.expand(n * n)]).float().contiguous()
            bias = torch.cat([bias_pre, bias_post, bias_res.flatten()]).float().contiguous()
            T = p.shape[0]
            mix = torch.empty(T, n, n + 1, dtype=torch.float32, device=H.device)
            post = torch.empty(T, n, dtype=torch.float32, device=H.device)
            logs = torch.empty(T, iters, 2, n, dtype=torch.float32, device=H.device)
            if T:
                K.mhc_coeff_fwd[(T,)](p, gate, bias, mix, post, logs, iters, N=n, NP=_p2(n))
        ctx.save_for_backward(xf, W, p, rstd, gate, bias, mix, post, logs)
        ctx.iters, ctx.shape, ctx.dtypes = iters, H.shape, (H.dtype, phi.dtype, gate_pre.dtype, bias_pre.dtype)
        return mix.view(*lead, n, n + 1), post.view(*lead, n)

    @staticmethod
    def backward(ctx, g_mix, g_post):
        xf, W, p, rstd, gate, bias, mix, post, logs = ctx.saved_tensors
        T, n = post.shape
        h_dt, phi_dt, g_dt, b_dt = ctx.dtypes
        g_mix = torch.zeros_like(mix) if g_mix is None else g_mix.reshape(T, n, n + 1).float().contiguous()
        g_post = torch.zeros_like(post) if g_post is None else g_post.reshape(T, n).float().contiguous()
        gl = torch.empty_like(p)
        if T:
            K.mhc_coeff_bwd[(T,)](p, gate, bias, mix, post, logs, g_mix, g_post, gl, ctx.iters, N=n, NP=_p2(n))
        grad_gate = (gl * p).sum(0)  # (2n + n^2,)
        grad_bias = gl.sum(0)
        grad_x, grad_wt = normed_linear_backward((xf, W, None, rstd, p), gl * gate, ctx.needs_input_grad[0],
                                                 ctx.needs_input_grad[1])
        grads = [
            None if grad_x is None else grad_x.view(ctx.shape).to(h_dt),
            None if grad_wt is None else grad_wt.t().to(phi_dt),
            grad_gate[:n].sum().view(1).to(g_dt), grad_gate[n: 2 * n].sum().view(1).to(g_dt),
            grad_gate[2 * n:].sum().view(1).to(g_dt),
            grad_bias[:n].to(b_dt), grad_bias[n: 2 * n].to(b_dt), grad_bias[2 * n:].view(n, n).to(b_dt),
        ]
        return (*grads, None, None)


def mhc_coefficients(conn, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([H_pre^T | H_res^T] (..., n, 1 + n), H_post (..., n))`` in fp32 (mHC Eqs. 7-9)."""
    return _MHCCoefficients.apply(H, conn.phi, conn.gate_pre, conn.gate_post, conn.gate_res, conn.bias_pre,
                                  conn.bias_post, conn.bias_res, conn.sinkhorn_iters, conn.norm_eps)


def mhc_width(conn, H: torch.Tensor, prims: Primitives):
    """mHC width step: the coefficient Function, then the Triton mix."""
    mix_, h_post = mhc_coefficients(conn, H)
    h_in, residual = stream_mix(H, mix_, 1, prims)
    return h_in.flatten(-2), WidthContext(residual, h_post)
