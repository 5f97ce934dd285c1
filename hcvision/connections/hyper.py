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
import torch.nn.functional as F
from torch import nn

from .base import FRAC_KINDS, Connection, WidthContext

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

    def _normed_projection(self, H: torch.Tensor) -> torch.Tensor:
        """``norm(H) W`` with the norm applied after the matmul (same function, no normalised copy of the streams).

        LayerNorm: ``norm(H) W = rstd * (H W' - mu * 1^T W') + b W`` with ``W' = diag(gamma) W``; RMSNorm:
        ``rstd * H W'``. Only per-stream statistics and the small projection are new tensors (see :func:`normed_linear`).
        """
        W = self.dynamic_weight.to(H.dtype)
        norm = self.norm
        if isinstance(norm, nn.Identity):
            return F.linear(H, W.t().contiguous())  # (J, c) weight: the fast matmul layout for forward and backward
        weight = norm.weight
        Wp = W if weight is None else weight.to(H.dtype).unsqueeze(-1) * W
        if isinstance(norm, nn.LayerNorm):
            proj = normed_linear(H, Wp.t().contiguous(), center=True, eps=norm.eps)
            return proj if norm.bias is None else proj + norm.bias.to(H.dtype) @ W
        eps = norm.eps if norm.eps is not None else torch.finfo(H.dtype).eps
        return normed_linear(H, Wp.t().contiguous(), center=False, eps=eps)

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
            ctx.weight_dtype = weight.dtype
            return _NormedLinear._forward(ctx, x, weight.to(x.dtype), center, eps)

    @staticmethod
    def _forward(ctx, x: torch.Tensor, weight: torch.Tensor, center: bool, eps: float):
        c, J = x.shape[-1], weight.shape[0]
        xf = x.reshape(-1, c)
        stat = torch.promote_types(x.dtype, torch.float32)
        ms = torch.linalg.vector_norm(xf, dim=-1, dtype=stat).square_().div_(c)
        proj = torch.mm(xf, weight.t())  # (R, J)
        if center:
            mean = xf.mean(dim=-1, dtype=stat)
            var = ms.sub_(mean.square()).clamp_min_(0.0)
            proj.sub_(mean.unsqueeze(-1).to(proj.dtype) * weight.sum(-1).to(proj.dtype))
        else:
            mean, var = None, ms
        rstd = var.add_(eps).rsqrt_()
        proj.mul_(rstd.unsqueeze(-1).to(proj.dtype))
        ctx.save_for_backward(xf, weight, mean, rstd, proj)
        ctx.x_shape = x.shape
        return proj.view(*x.shape[:-1], J)

    @staticmethod
    def backward(ctx, grad_proj: torch.Tensor):
        xf, weight, mean, rstd, proj = ctx.saved_tensors
        c = xf.shape[-1]
        g = grad_proj.reshape(proj.shape).to(proj.dtype)
        rstd_c = rstd.to(proj.dtype).unsqueeze(-1)
        grad_u = g * rstd_c  # d/d(x W^T)
        # rstd = (var + eps)^(-1/2), var = E[x^2] - mu^2: d var / d x = 2 (x - mu) / c
        grad_var = (g * proj).sum(-1, keepdim=True) * rstd_c.square() * -0.5
        scale_x = grad_var * (2.0 / c)
        shift = torch.zeros_like(scale_x)
        grad_weight = None
        if mean is not None:
            mean_c = mean.to(proj.dtype).unsqueeze(-1)
            grad_mean = -(grad_u * weight.sum(-1).to(proj.dtype)).sum(-1, keepdim=True) - 2.0 * mean_c * grad_var
            shift = grad_mean / c
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad_u W + shift, as one matmul over [grad_u | shift] and [W ; 1], then + scale_x * x in place
            ones = weight.new_ones(1, c)
            grad_x = torch.mm(torch.cat([grad_u, shift], dim=-1), torch.cat([weight, ones], dim=0))
            grad_x.addcmul_(scale_x, xf)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_u.t(), xf)  # (J, c)
            if mean is not None:  # through s = W 1 in the centring term
                grad_weight.sub_((grad_u * mean_c).sum(0).unsqueeze(-1))
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_x, grad_weight, None, None


def normed_linear(x: torch.Tensor, weight: torch.Tensor, *, center: bool, eps: float) -> torch.Tensor:
    """``norm(x) @ weight.T`` for a parameter-free LayerNorm (``center=True``) or RMSNorm over the last dim.

    ``weight`` is ``(J, c)``; fold a norm's affine scale into it beforehand (``diag(gamma) W``) and add ``b W`` after.
    """
    return _NormedLinear.apply(x, weight, bool(center), float(eps))
