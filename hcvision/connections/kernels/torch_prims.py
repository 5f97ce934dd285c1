"""Torch primitives for the fused autograd Functions: batched matmuls in the layouts that are fast on CPU and GPU,
and, on CPU when built (``HCV_CPU_KERNELS=build``, :mod:`.cpu_loops`), compiled loops for the width mix and the depth
backward.

A :class:`Primitives` bundle is what :mod:`.functions` runs on; :mod:`.triton_ops` provides the same bundle as Triton
kernels, so each Function and its backward are written once.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import cpu_loops

__all__ = ["Primitives", "TORCH", "bmm", "sum_to", "mix_product", "mix_product_backward", "depth_forward",
           "depth_backward", "normed_linear_forward", "normed_linear_backward"]


class Primitives(NamedTuple):
    """The stream-sized passes of one backend (every other op of the fast paths is on small coefficient tensors).

    * ``mix(H, mix) -> out``: ``out[..., j, :] = sum_i mix[..., i, j] H[..., i, :]`` (HC Eqs. 3-4 in one product);
    * ``mix_backward(H, mix, g_in, g_res, need_H, need_mix, grad_H=None) -> (grad_H, grad_mix per token)``;
    * ``depth_forward(R, beta, y) -> R + beta y`` (Eq. 5; ``beta (..., n, 1)``, ``y (..., k, c)``, ``k`` 1 or n);
    * ``depth_backward(G, beta, y, need_y, need_beta) -> (grad_y, grad_beta per token)``;
    * ``normed_linear_forward(x, W, center, eps) -> (proj, saved)`` and ``normed_linear_backward(saved, g, need_x,
      need_W, grad_x_into=None) -> (grad_x, grad_W)`` for ``norm(x) W^T`` over rows of ``x``.
    """

    name: str
    mix: Callable
    mix_backward: Callable
    depth_forward: Callable
    depth_backward: Callable
    normed_linear_forward: Callable
    normed_linear_backward: Callable


def sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a per-token gradient to a (static) input's shape; no-op when the shapes agree."""
    if grad.shape == shape:
        return grad
    return grad.sum_to_size(shape)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


def mix_product(H: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``mix^T H`` per token: ``(..., J, c)`` from H ``(..., n, c)`` and mix ``(n, J)`` or ``(..., n, J)``."""
    if cpu_loops.available(H, mix):
        return cpu_loops.mix_forward(H, mix)
    return bmm(mix.transpose(-2, -1), H)


def mix_product_backward(H, mix, g_in, g_res, need_H: bool, need_mix: bool, grad_H: torch.Tensor | None = None):
    """Gradients of :func:`mix_product` for ``G = [g_in; g_res]``: ``(mix G, H G^T)`` (per token), ``None`` where not
    needed; with ``grad_H`` given, ``mix G`` is added into it in place."""
    if cpu_loops.available(H, mix):
        return cpu_loops.mix_backward(H, mix, g_in.to(H.dtype), g_res.to(H.dtype), need_H=need_H, need_mix=need_mix,
                                      grad_H=grad_H)
    G = torch.cat([g_in, g_res], dim=-2)  # (..., k + n, c)
    grad_mix = bmm(H, G.transpose(-2, -1)) if need_mix else None
    if need_H and grad_H is not None:
        n, c, J = H.shape[-2], H.shape[-1], mix.shape[-1]
        lead = torch.broadcast_shapes(H.shape[:-2], mix.shape[:-2])
        grad_H.view(-1, n, c).baddbmm_(mix.to(grad_H.dtype).expand(*lead, n, J).reshape(-1, n, J),
                                        G.to(grad_H.dtype).reshape(-1, J, c))
    elif need_H:
        grad_H = bmm(mix, G)
    return grad_H, grad_mix


def depth_forward(residual: torch.Tensor, beta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``R + beta y`` (Eq. 5): one pass over the streams."""
    return torch.addcmul(residual, beta, y)


def depth_backward(G: torch.Tensor, beta: torch.Tensor, y: torch.Tensor, need_y: bool, need_beta: bool):
    """For ``H' = R + beta y``: ``grad y`` and the per-token ``grad beta`` (reduced by the caller).

    HC (``y`` one row): ``grad y = B^T G`` and ``grad B = G y^T`` as small matmuls over n (or one CPU loop), where
    autograd's addcmul backward materialises ``G * B`` and ``G * y`` (each ``n c`` per token) and then reduces.
    FC (``y`` one row per fraction): elementwise.
    """
    if y.shape[-2] != 1 or G.shape[-2] == 1:
        gy = G * beta if need_y else None
        gb = (G * y).sum(-1, keepdim=True) if need_beta else None
        return gy, gb
    lead = G.shape[:-2]
    if (beta.dim() == 2 or beta.shape[:-2] == lead) and y.shape[:-2] == lead and cpu_loops.available(G, beta):
        return cpu_loops.depth_backward(G, beta, y, need_y=need_y, need_beta=need_beta)
    gb = bmm(G, y.transpose(-2, -1)) if need_beta else None  # (..., n, 1)
    gy = bmm(beta.transpose(-2, -1), G) if need_y else None  # (..., 1, c)
    return gy, gb


def normed_linear_forward(x: torch.Tensor, weight: torch.Tensor, center: bool, eps: float | None):
    """``(p, saved)`` with ``p = rstd * (x W^T - mu s^T)`` as ``(rows, J)``; ``eps=None`` means no norm at all.

    Statistics in fp32 or better: ``var = E[x^2] - mu^2`` from two single-pass reductions (``torch.var_mean`` costs
    ~30 passes here). Measured in fp32 against float64 LayerNorm: relative error 3e-6 when a stream's mean is 4x its
    spread, 7e-5 at 30x, 1e-3 at 100x; the coefficients it feeds are squashed by tanh and scaled by ``s = 0.01``.
    """
    c = x.shape[-1]
    xf = x.reshape(-1, c)
    proj = torch.mm(xf, weight.t())  # (R, J): W row-major is the fast layout for a skinny matmul
    mean = rstd = None
    if eps is not None:
        stat = torch.promote_types(x.dtype, torch.float32)
        ms = torch.linalg.vector_norm(xf, dim=-1, dtype=stat).square_().div_(c)
        if center:
            mean = xf.mean(dim=-1, dtype=stat)
            ms.sub_(mean.square()).clamp_min_(0.0)
            proj.sub_(mean.unsqueeze(-1).to(proj.dtype) * weight.sum(-1).to(proj.dtype))
        rstd = ms.add_(eps).rsqrt_()
        proj.mul_(rstd.unsqueeze(-1).to(proj.dtype))
    return proj, (xf, weight, mean, rstd, proj)


def normed_linear_backward(saved: tuple, grad_proj: torch.Tensor, need_x: bool, need_weight: bool,
                           grad_x_into: torch.Tensor | None = None):
    """Gradients of :func:`normed_linear_forward` for ``x`` (rows, c) and ``weight``, given ``grad_proj`` (rows, J).

    With ``grad_x_into`` (rows, c) the gradient of ``x`` is added into it in place (``addmm_``) instead of written anew.
    """
    xf, weight, mean, rstd, proj = saved
    c = xf.shape[-1]
    g = grad_proj.to(proj.dtype)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, b) if grad_x_into is None else grad_x_into.addmm_(a, b)

    if rstd is None:
        grad_x = matmul(g, weight) if need_x else None
        return grad_x, (torch.mm(g.t(), xf) if need_weight else None)
    rstd_c = rstd.to(proj.dtype).unsqueeze(-1)
    grad_u = g * rstd_c  # d/d(x W^T)
    # rstd = (var + eps)^(-1/2), var = E[x^2] - mu^2: d var / d x = 2 (x - mu) / c
    grad_var = (g * proj).sum(-1, keepdim=True) * rstd_c.square() * -0.5
    grad_x = grad_weight = None
    if need_x:
        if mean is None:
            grad_x = matmul(grad_u, weight)
        else:  # grad_u W + grad_mu / c, as one matmul over [grad_u | grad_mu / c] and [W ; 1]
            grad_mean = -(grad_u * weight.sum(-1).to(proj.dtype)).sum(-1, keepdim=True)
            grad_mean -= 2.0 * mean.to(proj.dtype).unsqueeze(-1) * grad_var
            grad_x = matmul(torch.cat([grad_u, grad_mean / c], dim=-1), torch.cat([weight, weight.new_ones(1, c)]))
        grad_x.addcmul_(grad_var * (2.0 / c), xf)
    if need_weight:
        grad_weight = torch.mm(grad_u.t(), xf)  # (J, c): g^T x is the fast layout
        if mean is not None:  # through s = W 1 in the centring term
            grad_weight.sub_((grad_u * mean.to(proj.dtype).unsqueeze(-1)).sum(0).unsqueeze(-1))
    return grad_x, grad_weight


TORCH = Primitives("torch", mix_product, mix_product_backward, depth_forward, depth_backward, normed_linear_forward,
                   normed_linear_backward)
