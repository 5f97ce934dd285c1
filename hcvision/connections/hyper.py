"""Residual, Hyper-Connections (SHC/DHC) and Frac-Connections (SFC/DFC).

HC and FC share one parametrisation; only the stream layout differs (see :mod:`hcvision.connections.base`):

* static (Hyper-Connections Eq. 1 / Frac-Connections Sec. 3): learnable ``A = [A_in | A_r]`` of shape ``(n, k + n)``
  and ``B`` of shape ``(n,)``;
* dynamic (HC Eqs. 10-13, applied to fractions for DFC)::

      Hn       = norm(H)                                  # per stream, over its c channels
      B(H)     = s_b * tanh(Hn W_b)^T + B                  # Eq. 11
      A_in(H)  = s_a * tanh(Hn W_in) + A_in                # Eq. 12 (A_m for HC, Y for FC)
      A_r(H)   = s_a * tanh(Hn W_r) + A_r                  # Eq. 13

  ``W_in | W_r | W_b`` are one fused ``(c, k + n + 1)`` projection, zero at init; ``s_a, s_b`` start at 0.01.

Init (HC Eq. 14 for sublayer k): ``B = 1``, ``A_m = e_{k mod n}``, ``A_r = I``. FC (Frac-Connections Eq. 15): ``B = 1``,
``Y = I``, ``A = I``. Both make the network compute exactly what the Pre-Norm residual network computes.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FRAC_KINDS, Connection, WidthContext, _sum_to, _mix_product, _mix_product_backward

__all__ = ["ResidualConnection", "HyperConnection", "hc_init_matrix", "normed_linear"]


class ResidualConnection(Connection):
    """``x + T(x)`` through the common API: one stream, ``A = [1 | 1]``, ``B = 1``. Nothing is learned."""

    def __init__(self, dim: int, rate: int = 1, layer_index: int = 0) -> None:
        super().__init__("residual", dim, rate, layer_index)
        self.register_buffer("_one", torch.ones(1, 2), persistent=False)

    def coefficients(self, H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._one, self._one[0, :1]

    def width(self, H: torch.Tensor) -> tuple[torch.Tensor, WidthContext]:
        return H.squeeze(-2), WidthContext(H, self._one[0, :1])

    def depth(self, y: torch.Tensor, ctx: WidthContext) -> torch.Tensor:
        return ctx.residual + y.unsqueeze(-2)


def hc_init_matrix(kind: str, rate: int, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial ``(A, B)`` of HC Eq. 14 (HC kinds) or FC Eq. 15 (FC kinds)."""
    eye = torch.eye(rate)
    if kind in FRAC_KINDS:
        a_in = eye.clone()
    else:
        a_in = torch.zeros(rate, 1)
        a_in[layer_index % rate, 0] = 1.0
    return torch.cat([a_in, eye], dim=1), torch.ones(rate)


def _build_norm(norm: str, dim: int, affine: bool, eps: float) -> nn.Module:
    if norm == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown dynamic norm {norm!r}; accepted: 'layernorm', 'rmsnorm', 'none'")


class HyperConnection(Connection):
    """SHC / DHC (``n`` copies) and SFC / DFC (``m`` fractions) around one sublayer.

    Args:
        kind: ``shc``, ``dhc``, ``sfc`` or ``dfc``.
        dim: hidden size C of the model.
        rate: expansion rate n (HC) or number of fractions m (FC).
        layer_index: 0-based index k of the sublayer (attention and MLP count separately); picks ``e_{k mod n}``.
        tanh: apply tanh to the dynamic projections (the paper's default; ``False`` is its "w/o tanh" ablation).
        scale_init: initial value of ``s_a`` and ``s_b`` (paper: 0.01).
        norm / norm_affine / norm_eps: the norm applied to each stream before the dynamic projections.
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        rate: int,
        layer_index: int,
        *,
        tanh: bool = True,
        scale_init: float = 0.01,
        norm: str = "layernorm",
        norm_affine: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__(kind, dim, rate, layer_index)
        if self.kind not in ("shc", "dhc", "sfc", "dfc"):
            raise ValueError(f"HyperConnection builds shc, dhc, sfc or dfc; got {kind!r}")
        self.dynamic = self.kind in ("dhc", "dfc")
        self.use_tanh = bool(tanh)
        a_init, b_init = hc_init_matrix(self.kind, self.num_streams, layer_index)
        # Static part of Eq. 1 (rows: input streams; columns: k branch-input slots then n output streams).
        self.static_alpha = nn.Parameter(a_init)
        self.static_beta = nn.Parameter(b_init)
        if self.dynamic:
            self.norm = _build_norm(norm, self.stream_dim, norm_affine, norm_eps)
            width = self.num_inputs + self.num_streams
            # Fused [W_in | W_r | W_b]: zero at init, so dynamic and static start identical (Sec. 2.3).
            self.dynamic_weight = nn.Parameter(torch.zeros(self.stream_dim, width + 1))
            self.dynamic_alpha_scale = nn.Parameter(torch.full((1,), float(scale_init)))
            self.dynamic_beta_scale = nn.Parameter(torch.full((1,), float(scale_init)))

    def static_parameters(self) -> list[nn.Parameter]:
        return [self.static_alpha, self.static_beta]

    def static_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.static_alpha, self.static_beta

    def coefficients(self, H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dynamic or H is None:
            return self.static_alpha, self.static_beta
        if self.fused:
            proj = self._normed_projection(H)
        else:
            proj = self.norm(H) @ self.dynamic_weight.to(H.dtype)  # (..., n, k + n + 1), Eqs. 11-13 before tanh
        if self.use_tanh:
            proj = torch.tanh(proj)
        alpha = torch.addcmul(self.static_alpha.to(proj.dtype), self.dynamic_alpha_scale.to(proj.dtype), proj[..., :-1])
        beta = torch.addcmul(self.static_beta.to(proj.dtype), self.dynamic_beta_scale.to(proj.dtype), proj[..., -1])
        return alpha, beta

    def width(self, H: torch.Tensor) -> tuple[torch.Tensor, WidthContext]:
        if not (self.dynamic and self.fused):
            return super().width(H)
        # Eqs. 10-13 and the width mix in one Function (see _DynamicWidth); same function as coefficients() + mix.
        weight, bias, center, eps = self._projection_operands(H)
        h_in, residual, beta = _DynamicWidth.apply(
            H, weight, bias, self.static_alpha, self.static_beta, self.dynamic_alpha_scale,
            self.dynamic_beta_scale, self.num_inputs, center, eps, self.use_tanh,
        )
        return h_in.flatten(-2), WidthContext(residual, beta)

    def _normed_projection(self, H: torch.Tensor) -> torch.Tensor:
        """``norm(H) W`` with the norm applied after the matmul (same function, no normalised copy of the streams)."""
        weight, bias, center, eps = self._projection_operands(H)
        proj = normed_linear(H, weight, center=center, eps=eps)
        return proj if bias is None else proj + bias

    def _projection_operands(self, H: torch.Tensor):
        """``(W'^T, b W, center, eps)`` such that ``norm(H) W = rstd * (H W' - mu 1^T W') + b W``.

        ``W' = diag(gamma) W`` folds the norm's scale into the projection, ``(J, c)`` row-major (the fast layout for a
        skinny matmul); ``center`` is False for RMSNorm (``mu = 0``) and ``eps`` None without a norm (``rstd = 1``).
        """
        W = self.dynamic_weight.to(H.dtype)
        norm = self.norm
        if isinstance(norm, nn.Identity):
            return W.t().contiguous(), None, False, None
        Wp = W if norm.weight is None else norm.weight.to(H.dtype).unsqueeze(-1) * W
        eps = norm.eps if norm.eps is not None else torch.finfo(H.dtype).eps
        bias = getattr(norm, "bias", None)
        bias = None if bias is None else bias.to(H.dtype) @ W
        return Wp.t().contiguous(), bias, isinstance(norm, nn.LayerNorm), eps

    @torch.no_grad()
    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Load the static part from a connection matrix ``[[0, B], [A_in, A_r]]`` (e.g. Eqs. 17-19)."""
        n, k = self.num_streams, self.num_inputs
        expected = (1 + n, k + n)
        if tuple(matrix.shape) != expected:
            raise ValueError(f"connection matrix must have shape {expected} for {self.kind}x{n}, got {tuple(matrix.shape)}")
        self.static_beta.copy_(matrix[0, k:])
        self.static_alpha.copy_(matrix[1:, :])



# ---------------------------------------------------------------------------------------------------------------
# Normalised projection for the dynamic coefficients (checked against the plain path in tests/test_connections_fast.py)
# ---------------------------------------------------------------------------------------------------------------
def _normed_linear_forward(x: torch.Tensor, weight: torch.Tensor, center: bool, eps: float | None):
    """``(p, saved)`` with ``p = rstd * (x W^T - mu s^T)`` as ``(rows, J)``; ``eps=None`` means no norm at all."""
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


def _normed_linear_backward(saved: tuple, grad_proj: torch.Tensor, need_x: bool, need_weight: bool,
                            grad_x_into: torch.Tensor | None = None):
    """Gradients of :func:`_normed_linear_forward` for ``x`` (rows, c) and ``weight``, given ``grad_proj`` (rows, J).

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


class _NormedLinear(torch.autograd.Function):
    """``p = rstd * (x W^T - mu s^T)`` over the last dim of ``x``; ``s = W 1`` (row sums), ``mu = 0`` without centring.

    Why a Function: autograd through ``var_mean``, the matmul and the centring keeps and re-reads several full-size
    tensors and sums three gradients of ``x``; here the backward is one matmul and one in-place ``addcmul`` per pass
    over ``x``. The matmuls use the layouts that are fast for a skinny ``W`` (J of 5-25 rows): ``x @ W^T`` with ``W``
    row-major, ``g^T @ x`` for the weight gradient. Statistics are in fp32 or better: ``var = E[x^2] - mu^2`` from two
    single-pass reductions (``torch.var_mean`` costs ~30 passes here). Measured in fp32 against float64 LayerNorm: relative
    error 3e-6 when a stream's mean is 4x its spread, 7e-5 at 30x, 1e-3 at 100x; the coefficients it feeds are squashed
    by tanh and scaled by ``s = 0.01``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, center: bool, eps: float):
        with torch.autocast(device_type=x.device.type, enabled=False):  # in x's dtype: the streams stay fp32 under AMP
            proj, saved = _normed_linear_forward(x, weight.to(x.dtype), center, eps)
        ctx.save_for_backward(*saved)
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return proj.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_proj: torch.Tensor):
        saved = ctx.saved_tensors
        grad_x, grad_weight = _normed_linear_backward(
            saved, grad_proj.reshape(saved[-1].shape), ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_x, grad_weight, None, None


class _DynamicWidth(torch.autograd.Function):
    """DHC/DFC width step (Eqs. 10-13, then Eqs. 3-4) from the streams ``H`` in one node.

    Forward: ``p = norm(H) W`` (:func:`_normed_linear_forward`), ``t = tanh(p)``, ``A = A_static + s_a t[:-1]``,
    ``B = B_static + s_b t[-1]``, ``[h_in | R] = A^T H``. Why one node: the two gradients that reach ``H`` (through the
    mix and through the projection) are summed in place (``baddbmm_``) instead of by a separate pass, and the dozen small
    coefficient ops have no autograd bookkeeping. Saves H, the per-token A and t, and the norm statistics.
    """

    @staticmethod
    def forward(ctx, H, weight, bias, static_alpha, static_beta, alpha_scale, beta_scale, k, center, eps, use_tanh):
        with torch.autocast(device_type=H.device.type, enabled=False):  # coefficients and mix in the streams' dtype
            dt = H.dtype
            proj, saved = _normed_linear_forward(H, weight.to(dt), center, eps)
            if bias is not None:
                proj = proj + bias.to(dt)
            t = (torch.tanh(proj) if use_tanh else proj).view(*H.shape[:-1], -1)  # (..., n, k + n + 1)
            alpha = torch.addcmul(static_alpha.to(dt), alpha_scale.to(dt), t[..., :-1])
            beta = torch.addcmul(static_beta.to(dt), beta_scale.to(dt), t[..., -1])
            out = _mix_product(H, alpha)
        ctx.save_for_backward(H, alpha, t, alpha_scale, beta_scale, *saved[1:])
        ctx.k, ctx.use_tanh, ctx.has_bias = k, use_tanh, bias is not None
        ctx.dtypes = (weight.dtype, static_alpha.dtype, static_beta.dtype, alpha_scale.dtype, beta_scale.dtype)
        return out[..., :k, :].contiguous(), out[..., k:, :], beta

    @staticmethod
    def backward(ctx, g_in, g_res, g_beta):
        H, alpha, t, alpha_scale, beta_scale, weight, mean, rstd, proj = ctx.saved_tensors
        k, dt = ctx.k, H.dtype
        n, c = H.shape[-2], H.shape[-1]
        lead = alpha.shape[:-2]
        g_in = H.new_zeros(*lead, k, c) if g_in is None else g_in.to(dt)
        g_res = H.new_zeros(*lead, n, c) if g_res is None else g_res.to(dt)
        g_beta = H.new_zeros(*lead, n) if g_beta is None else g_beta.to(dt)
        # grad H = A [g_in; g_res] + (the projection's term, added in place); both from one pass over H and G
        need_H = ctx.needs_input_grad[0]
        grad_H, grad_alpha = _mix_product_backward(H, alpha, g_in, g_res, need_H, True)  # (..., n, c), (..., n, k + n)
        t_alpha, t_beta = t[..., :-1], t[..., -1]
        grad_t = torch.cat([grad_alpha * alpha_scale.to(dt), (g_beta * beta_scale.to(dt)).unsqueeze(-1)], dim=-1)
        grad_proj = grad_t * (1.0 - t * t) if ctx.use_tanh else grad_t
        grad_proj = grad_proj.reshape(proj.shape)
        xf = H.reshape(-1, c)
        _, grad_weight = _normed_linear_backward(
            (xf, weight, mean, rstd, proj), grad_proj, need_H, ctx.needs_input_grad[1],
            grad_x_into=None if grad_H is None else grad_H.view(-1, c),
        )
        w_dt, a_dt, b_dt, sa_dt, sb_dt = ctx.dtypes
        grads = [
            grad_H,
            None if grad_weight is None else grad_weight.to(w_dt),
            grad_proj.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None,
            _sum_to(grad_alpha, alpha.shape[-2:]).to(a_dt) if ctx.needs_input_grad[3] else None,
            _sum_to(g_beta, g_beta.shape[-1:]).to(b_dt) if ctx.needs_input_grad[4] else None,
            (grad_alpha * t_alpha).sum().view(1).to(sa_dt) if ctx.needs_input_grad[5] else None,
            (g_beta * t_beta).sum().view(1).to(sb_dt) if ctx.needs_input_grad[6] else None,
        ]
        return (*grads, None, None, None, None)


def normed_linear(x: torch.Tensor, weight: torch.Tensor, *, center: bool, eps: float | None) -> torch.Tensor:
    """``norm(x) @ weight.T`` for a parameter-free LayerNorm (``center=True``) or RMSNorm over the last dim.

    ``weight`` is ``(J, c)``; fold a norm's affine scale into it beforehand (``diag(gamma) W``) and add ``b W`` after.
    ``eps=None`` skips the norm (plain ``x @ weight.T`` with the same fast layouts).
    """
    return _NormedLinear.apply(x, weight, bool(center), None if eps is None else float(eps))
