"""Fused autograd Functions for the width and depth steps of SHC/DHC/SFC/DFC (and the mix and depth of mHC).

Each Function computes exactly what the reference classes compute (:mod:`hcvision.connections.base`, ``hyper``), with
a hand-written backward that makes fewer passes over the stream tensor; the stream-sized passes come from a
:class:`~.torch_prims.Primitives` bundle (torch or Triton), so each backward is written once for both.
``tests/test_connections_fast.py`` and ``tests/test_kernels_triton.py`` check values and all gradients against the
reference path.
"""
from __future__ import annotations

import torch
from torch import nn

from ..context import WidthContext
from .torch_prims import Primitives, sum_to

__all__ = ["static_width", "dynamic_width", "depth", "stream_mix", "normed_linear", "projection_operands"]


class _StreamMix(torch.autograd.Function):
    """``[h_in | R] = mix^T H`` (HC Eqs. 3-4) in one pass over H, streams next to channels.

    Backward: the two incoming gradients give ``grad H = mix [g_in; g_R]`` and ``grad mix = H [g_in; g_R]^T`` in one
    pass each (the plain path instead zero-fills and copies a full buffer per slice, then adds them). Saves H and mix.
    """

    @staticmethod
    def forward(ctx, H: torch.Tensor, mix: torch.Tensor, k: int, prims: Primitives):
        out = prims.mix(H, mix)  # (..., k + n, c)
        ctx.save_for_backward(H, mix)
        ctx.k, ctx.prims = k, prims
        # The branch input gets its own buffer: its first op (a LayerNorm) would copy a strided view in forward and
        # again in backward, and by keeping the view it would keep the whole (k + n) c buffer alive until backward.
        return out[..., :k, :].contiguous(), out[..., k:, :]

    @staticmethod
    def backward(ctx, g_in: torch.Tensor | None, g_res: torch.Tensor | None):
        H, mix = ctx.saved_tensors
        k = ctx.k
        lead = torch.broadcast_shapes(H.shape[:-2], mix.shape[:-2])
        n, c = H.shape[-2], H.shape[-1]
        g_in = H.new_zeros(*lead, k, c) if g_in is None else g_in.to(H.dtype)
        g_res = H.new_zeros(*lead, n, c) if g_res is None else g_res.to(H.dtype)
        grad_H, grad_mix = ctx.prims.mix_backward(H, mix, g_in, g_res, ctx.needs_input_grad[0],
                                                  ctx.needs_input_grad[1])
        if grad_H is not None:
            grad_H = sum_to(grad_H, H.shape).to(H.dtype)
        if grad_mix is not None:
            grad_mix = sum_to(grad_mix, mix.shape).to(mix.dtype)  # (..., n, k + n)
        return grad_H, grad_mix, None, None


class _Depth(torch.autograd.Function):
    """``H_out = R + B y`` (Eq. 5): HC (one branch output broadcast to n streams) or FC (fraction j scaled by B_j).

    Backward without stream-sized temporaries: ``grad y`` and ``grad B`` come from one pass over the incoming gradient
    (see ``Primitives.depth_backward``). Saves y and B.
    """

    @staticmethod
    def forward(ctx, residual: torch.Tensor, beta: torch.Tensor, y: torch.Tensor, prims: Primitives):
        ctx.save_for_backward(beta, y)
        ctx.residual_shape, ctx.residual_dtype, ctx.prims = residual.shape, residual.dtype, prims
        return prims.depth_forward(residual, beta, y)

    @staticmethod
    def backward(ctx, G: torch.Tensor):
        beta, y = ctx.saved_tensors  # beta (..., n, 1), y (..., k, c)
        grad_res = grad_beta = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_res = sum_to(G, ctx.residual_shape).to(ctx.residual_dtype)
        need_beta, need_y = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if need_beta or need_y:
            beta_g, y_g = beta.to(G.dtype), y.to(G.dtype)  # a bf16 y under autocast meets fp32 streams
            gy, gb = ctx.prims.depth_backward(G, beta_g, y_g, need_y, need_beta)
            grad_y = None if gy is None else sum_to(gy, y.shape).to(y.dtype)
            grad_beta = None if gb is None else sum_to(gb, beta.shape).to(beta.dtype)
        return grad_res, grad_beta, grad_y, None


class _NormedLinear(torch.autograd.Function):
    """``p = rstd * (x W^T - mu s^T)`` over the last dim of ``x``; ``s = W 1`` (row sums), ``mu = 0`` without centring.

    Why a Function: autograd through ``var_mean``, the matmul and the centring keeps and re-reads several full-size
    tensors and sums three gradients of ``x``; here the backward is one matmul and one in-place ``addcmul`` per pass
    over ``x``. The matmuls use the layouts that are fast for a skinny ``W`` (J of 5-25 rows).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, center: bool, eps: float, prims: Primitives):
        with torch.autocast(device_type=x.device.type, enabled=False):  # in x's dtype: the streams stay fp32 under AMP
            proj, saved = prims.normed_linear_forward(x, weight.to(x.dtype), center, eps)
        ctx.save_for_backward(*[t for t in saved if t is not None])
        ctx.layout = [t is not None for t in saved]
        ctx.x_shape, ctx.weight_dtype, ctx.prims = x.shape, weight.dtype, prims
        return proj.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_proj: torch.Tensor):
        it = iter(ctx.saved_tensors)
        saved = tuple(next(it) if present else None for present in ctx.layout)
        grad_x, grad_weight = ctx.prims.normed_linear_backward(
            saved, grad_proj.reshape(saved[-1].shape), ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_x, grad_weight, None, None, None


class _DynamicWidth(torch.autograd.Function):
    """DHC/DFC width step (HC Eqs. 10-13, then Eqs. 3-4) from the streams ``H`` in one node.

    Forward: ``p = norm(H) W``, ``t = tanh(p)``, ``A = A_static + s_a t[:-1]``, ``B = B_static + s_b t[-1]``,
    ``[h_in | R] = A^T H``. Why one node: the two gradients that reach ``H`` (through the mix and through the
    projection) are summed in place instead of by a separate pass, and the dozen small coefficient ops have no autograd
    bookkeeping. Saves H, the per-token A and t, and the norm statistics.
    """

    @staticmethod
    def forward(ctx, H, weight, bias, static_alpha, static_beta, alpha_scale, beta_scale, k, center, eps, use_tanh,
                prims):
        with torch.autocast(device_type=H.device.type, enabled=False):  # coefficients and mix in the streams' dtype
            dt = H.dtype
            proj, saved = prims.normed_linear_forward(H, weight.to(dt), center, eps)
            if bias is not None:
                proj = proj + bias.to(dt)
            t = (torch.tanh(proj) if use_tanh else proj).view(*H.shape[:-1], -1)  # (..., n, k + n + 1)
            alpha = torch.addcmul(static_alpha.to(dt), alpha_scale.to(dt), t[..., :-1])
            beta = torch.addcmul(static_beta.to(dt), beta_scale.to(dt), t[..., -1])
            out = prims.mix(H, alpha)
        _, W, mean, rstd, p = saved
        ctx.save_for_backward(H, alpha, t, alpha_scale, beta_scale, W, p, *[s for s in (mean, rstd) if s is not None])
        ctx.stats = (mean is not None, rstd is not None)
        ctx.k, ctx.use_tanh, ctx.has_bias, ctx.prims = k, use_tanh, bias is not None, prims
        ctx.dtypes = (weight.dtype, static_alpha.dtype, static_beta.dtype, alpha_scale.dtype, beta_scale.dtype)
        return out[..., :k, :].contiguous(), out[..., k:, :], beta

    @staticmethod
    def backward(ctx, g_in, g_res, g_beta):
        H, alpha, t, alpha_scale, beta_scale, weight, proj, *stats = ctx.saved_tensors
        has_mean, has_rstd = ctx.stats
        mean = stats.pop(0) if has_mean else None
        rstd = stats.pop(0) if has_rstd else None
        k, dt, prims = ctx.k, H.dtype, ctx.prims
        n, c = H.shape[-2], H.shape[-1]
        lead = alpha.shape[:-2]
        g_in = H.new_zeros(*lead, k, c) if g_in is None else g_in.to(dt)
        g_res = H.new_zeros(*lead, n, c) if g_res is None else g_res.to(dt)
        g_beta = H.new_zeros(*lead, n) if g_beta is None else g_beta.to(dt)
        # grad H = A [g_in; g_res] + (the projection's term, added in place); both from one pass over H and G
        need_H = ctx.needs_input_grad[0]
        grad_H, grad_alpha = prims.mix_backward(H, alpha, g_in, g_res, need_H, True)  # (..., n, c), (..., n, k + n)
        t_alpha, t_beta = t[..., :-1], t[..., -1]
        grad_t = torch.cat([grad_alpha * alpha_scale.to(dt), (g_beta * beta_scale.to(dt)).unsqueeze(-1)], dim=-1)
        grad_proj = grad_t * (1.0 - t * t) if ctx.use_tanh else grad_t
        grad_proj = grad_proj.reshape(proj.shape)
        xf = H.reshape(-1, c)
        _, grad_weight = prims.normed_linear_backward(
            (xf, weight, mean, rstd, proj), grad_proj, need_H, ctx.needs_input_grad[1],
            grad_x_into=None if grad_H is None else grad_H.view(-1, c),
        )
        w_dt, a_dt, b_dt, sa_dt, sb_dt = ctx.dtypes
        grads = [
            grad_H,
            None if grad_weight is None else grad_weight.to(w_dt),
            grad_proj.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None,
            sum_to(grad_alpha, alpha.shape[-2:]).to(a_dt) if ctx.needs_input_grad[3] else None,
            sum_to(g_beta, g_beta.shape[-1:]).to(b_dt) if ctx.needs_input_grad[4] else None,
            (grad_alpha * t_alpha).sum().view(1).to(sa_dt) if ctx.needs_input_grad[5] else None,
            (g_beta * t_beta).sum().view(1).to(sb_dt) if ctx.needs_input_grad[6] else None,
        ]
        return (*grads, None, None, None, None, None)


def stream_mix(H: torch.Tensor, mix: torch.Tensor, k: int, prims: Primitives) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused width mix: ``(A_in^T H, A_r^T H)`` with ``mix = [A_in | A_r]`` static ``(n, k+n)`` or per token."""
    return _StreamMix.apply(H, mix.to(H.dtype), k, prims)


def normed_linear(x: torch.Tensor, weight: torch.Tensor, *, center: bool, eps: float | None,
                  prims: Primitives | None = None) -> torch.Tensor:
    """``norm(x) @ weight.T`` for a parameter-free LayerNorm (``center=True``) or RMSNorm over the last dim.

    ``weight`` is ``(J, c)``; fold a norm's affine scale into it beforehand (``diag(gamma) W``) and add ``b W`` after.
    ``eps=None`` skips the norm (plain ``x @ weight.T`` with the same fast layouts).
    """
    if prims is None:
        from .torch_prims import TORCH as prims
    return _NormedLinear.apply(x, weight, bool(center), None if eps is None else float(eps), prims)


def projection_operands(conn, H: torch.Tensor):
    """``(W'^T, b W, center, eps)`` such that ``norm(H) W = rstd * (H W' - mu 1^T W') + b W`` (HC Eqs. 10-13).

    ``W' = diag(gamma) W`` folds the norm's scale into the projection, ``(J, c)`` row-major (the fast layout for a
    skinny matmul); ``center`` is False for RMSNorm (``mu = 0``) and ``eps`` None without a norm (``rstd = 1``).
    """
    W = conn.dynamic_weight.to(H.dtype)
    norm = conn.norm
    if isinstance(norm, nn.Identity):
        return W.t().contiguous(), None, False, None
    Wp = W if norm.weight is None else norm.weight.to(H.dtype).unsqueeze(-1) * W
    eps = norm.eps if norm.eps is not None else torch.finfo(H.dtype).eps
    bias = getattr(norm, "bias", None)
    bias = None if bias is None else bias.to(H.dtype) @ W
    return Wp.t().contiguous(), bias, isinstance(norm, nn.LayerNorm), eps


# --- the family entry points the dispatcher binds (conn: a Connection of that family) ---------------------------
def static_width(conn, H: torch.Tensor, prims: Primitives):
    """SHC/SFC width step: the static ``[A_in | A_r]`` applied in one fused mix."""
    h_in, residual = stream_mix(H, conn.static_alpha, conn.num_inputs, prims)
    return h_in.flatten(-2), WidthContext(residual, conn.static_beta)


def dynamic_width(conn, H: torch.Tensor, prims: Primitives):
    """DHC/DFC width step: coefficients (Eqs. 10-13) and mix in one Function."""
    weight, bias, center, eps = projection_operands(conn, H)
    h_in, residual, beta = _DynamicWidth.apply(
        H, weight, bias, conn.static_alpha, conn.static_beta, conn.dynamic_alpha_scale, conn.dynamic_beta_scale,
        conn.num_inputs, center, eps, conn.use_tanh, prims,
    )
    return h_in.flatten(-2), WidthContext(residual, beta)


def depth(conn, y: torch.Tensor, ctx: WidthContext, prims: Primitives) -> torch.Tensor:
    """Depth step (Eq. 5) ``H_out = B^T y + A_r^T H`` through :class:`_Depth`."""
    y = y.unflatten(-1, (conn.num_inputs, conn.stream_dim))
    beta = ctx.beta.unsqueeze(-1).to(y.dtype)
    return _Depth.apply(ctx.residual, beta, y, prims)
