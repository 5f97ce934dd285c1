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

from typing import Any, Callable, Optional

import torch
from torch import nn

from . import kinds
from .base import Connection, WidthContext

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
    if kinds.kind_record(kind).fractions:
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
        if kind not in _HC_FC:
            raise ValueError(f"HyperConnection builds {', '.join(_HC_FC)}; got {kind!r}")
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

    def dynamic_scale_parameters(self) -> list[nn.Parameter]:
        return [self.dynamic_alpha_scale, self.dynamic_beta_scale] if self.dynamic else []

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


# --- the kind table (see :mod:`.kinds`) --------------------------------------------------------------------------
COMMON_OPTIONS = ("recompute", "recompute_every")
FAST_OPTIONS = ("backend", "fused")
_DYNAMIC_OPTIONS = ("tanh", "scale_init", "norm", "norm_affine", "norm_eps")


def _hc_parameters(fractions: bool, dynamic: bool) -> Callable[[int, int, Optional[int]], int]:
    """HC paper, Appendix B: SHC ``n(n+2)``; DHC ``|norm| + C(n+2) + n(n+2) + 2``. SFC/DFC replace C by C/m and the
    one input column by ``m`` of them (``m x m`` blocks)."""
    def count(dim: int, rate: int, norm_params: Optional[int] = None) -> int:
        n, c = (rate, dim // rate) if fractions else (rate, dim)
        k = n if fractions else 1
        static = n * (k + n) + n
        if not dynamic:
            return static
        return (2 * c if norm_params is None else norm_params) + c * (k + n + 1) + static + 2
    return count


def _hc_builder(kind: str) -> Callable[..., HyperConnection]:
    def build(dim: int, rate: int, layer_index: int, **options: Any) -> HyperConnection:
        return HyperConnection(kind, dim, rate, layer_index, **options)
    build.__name__ = build.__qualname__ = f"build_{kind}"
    return build


kinds.register(kinds.KindRecord(
    name="residual", title="Pre-Norm residual baseline", layout="single", dynamic=False, tag="res",
    build=ResidualConnection, options=COMMON_OPTIONS, extra_parameters=lambda dim, rate, norm_params=None: 0))
_HC_FC = ("shc", "dhc", "sfc", "dfc")
for _kind, _title, _layout, _dynamic in (("shc", "static Hyper-Connections", "copies", False),
                                         ("dhc", "dynamic Hyper-Connections", "copies", True),
                                         ("sfc", "static Frac-Connections", "fractions", False),
                                         ("dfc", "dynamic Frac-Connections", "fractions", True)):
    kinds.register(kinds.KindRecord(
        name=_kind, title=_title, layout=_layout, dynamic=_dynamic, build=_hc_builder(_kind),
        options=(_DYNAMIC_OPTIONS if _dynamic else ()) + FAST_OPTIONS + COMMON_OPTIONS,
        family="dynamic" if _dynamic else "static",
        extra_parameters=_hc_parameters(_layout == "fractions", _dynamic)))
