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

from .base import FRAC_KINDS, Connection, WidthContext

__all__ = ["ResidualConnection", "HyperConnection", "hc_init_matrix"]


class ResidualConnection(Connection):
    """``x + T(x)`` through the common API: one stream, ``A = [1 | 1]``, ``B = 1``. Nothing is learned."""

    def __init__(self, dim: int, rate: int = 1, layer_index: int = 0, *, recompute: bool = False,
                 recompute_every: int = 6) -> None:
        super().__init__("residual", dim, rate, layer_index, recompute=recompute, recompute_every=recompute_every)
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
        backend / recompute / recompute_every: see :class:`~hcvision.connections.base.Connection`.
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
        **common,
    ) -> None:
        kind = str(kind).lower()
        if kind not in ("shc", "dhc", "sfc", "dfc"):
            raise ValueError(f"HyperConnection builds shc, dhc, sfc or dfc; got {kind!r}")
        self.dynamic = kind in ("dhc", "dfc")
        self.family = "dynamic" if self.dynamic else "static"
        super().__init__(kind, dim, rate, layer_index, **common)
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
        """``([A_in | A_r], B)``: the static ones, or per token for DHC/DFC (Eqs. 10-13)."""
        if not self.dynamic or H is None:
            return self.static_alpha, self.static_beta
        proj = self.norm(H) @ self.dynamic_weight.to(H.dtype)  # (..., n, k + n + 1): Hn [W_in | W_r | W_b]
        if self.use_tanh:
            proj = torch.tanh(proj)
        alpha = self.static_alpha.to(proj.dtype) + self.dynamic_alpha_scale.to(proj.dtype) * proj[..., :-1]  # 12-13
        beta = self.static_beta.to(proj.dtype) + self.dynamic_beta_scale.to(proj.dtype) * proj[..., -1]  # Eq. 11
        return alpha, beta

    @torch.no_grad()
    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Load the static part from a connection matrix ``[[0, B], [A_in, A_r]]`` (e.g. Eqs. 17-19)."""
        n, k = self.num_streams, self.num_inputs
        expected = (1 + n, k + n)
        if tuple(matrix.shape) != expected:
            raise ValueError(f"connection matrix must have shape {expected} for {self.kind}x{n}, got "
                             f"{tuple(matrix.shape)}")
        self.static_beta.copy_(matrix[0, k:])
        self.static_alpha.copy_(matrix[1:, :])
