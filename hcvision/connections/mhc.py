"""Manifold-constrained Hyper-Connections (mHC, arXiv 2512.24880).

For streams ``x`` of shape ``(n, C)`` (one token)::

    x~     = RMSNorm(vec(x))                        # over the flattened n*C, no affine (absorbed into phi)
    H~_pre = a_pre  * (x~ phi_pre)  + b_pre          # (1, n)
    H~_post= a_post * (x~ phi_post) + b_post         # (1, n)
    H~_res = a_res  * mat(x~ phi_res) + b_res        # (n, n)
    H_pre  = sigmoid(H~_pre);  H_post = 2 sigmoid(H~_post);  H_res = SinkhornKnopp(exp(H~_res))
    x_out  = H_res x + H_post^T F(H_pre x)

In the HC notation of :class:`~hcvision.connections.base.Connection`: ``A_m = H_pre^T``, ``A_r = H_res^T``,
``B = H_post``. The three projections are one fused ``(n*C, 2n + n^2)`` matmul, and the RMS normalisation is applied
after it (a per-token scalar), which is the same function and saves a pass over ``n*C``. The coefficients are computed
in fp32 even under autocast.

Init (the paper leaves ``b`` and ``phi`` open; ours, chosen to start at the identity map):

* ``phi = 0`` and gates ``a = 0.01``: at step 0 the coefficients equal their biases, for every input;
* ``b_pre = logit(1/n)``: ``H_pre = 1/n``, so with identical streams the branch input is exactly ``h``;
* ``b_post = 0``: ``H_post = 1``, each stream receives the full branch output (as HC's ``B = 1``);
* ``b_res = c I`` with ``c = log(d (n-1) / (1-d))``: ``H_res`` is doubly stochastic with diagonal ``d``
  (``res_init_diag``, default 0.95) and off-diagonal ``(1-d)/(n-1)``.

Since all streams start equal and ``H_res`` has unit row sums, the network at init computes exactly the Pre-Norm
residual network, while ``H_res`` stays close to ``I`` so that streams, once they differ, are not averaged away.
For ``n = 1`` there is nothing to mix: ``H_pre`` starts at 0.5, which a Pre-Norm branch does not see.

Sinkhorn-Knopp runs in the log domain (``L <- L - logsumexp(L)`` over columns, then rows), the same iterations as
normalising ``exp(L)``, but finite for any finite logits: in fp32 on ``exp(logits - max)`` a whole column underflows
once the logit spread passes ~170 and the next division gives NaN.

The fast paths (token-last coefficients with analytic backwards, the Triton coefficient kernel) are in
:mod:`hcvision.connections.kernels` and are tested against this module.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Connection

__all__ = ["ManifoldHyperConnection", "sinkhorn_knopp"]


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project ``exp(logits)`` (last two dims square) towards the doubly stochastic matrices (mHC Eq. 9).

    Each iteration normalises the columns, then the rows (Eq. 9: ``M_t = T_r(T_c(M_{t-1}))``), carried out on
    ``L = log M``: ``T_c`` is ``L - logsumexp_rows(L)``. Differentiated by autograd through the unrolled iterations, so
    gradients are exact for the computed function.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # T_c: unit column sums
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # T_r: unit row sums
    return torch.exp(log_m)


class ManifoldHyperConnection(Connection):
    """mHC around one sublayer. See the module docstring for the equations and the init."""

    dynamic = True
    family = "mhc"

    def __init__(
        self,
        dim: int,
        rate: int,
        layer_index: int,
        *,
        gate_init: float = 0.01,
        sinkhorn_iters: int = 20,
        res_init_diag: float = 0.95,
        norm_eps: float = 1e-6,
        **common,
    ) -> None:
        super().__init__("mhc", dim, rate, layer_index, **common)
        n = self.num_streams
        if not 0.0 < res_init_diag < 1.0 and n > 1:
            raise ValueError(f"res_init_diag must lie in (0, 1), got {res_init_diag}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.norm_eps = float(norm_eps)
        # Fused phi = [phi_pre | phi_post | phi_res] over vec(x) in R^{nC}.
        self.phi = nn.Parameter(torch.zeros(n * dim, 2 * n + n * n))
        self.gate_pre = nn.Parameter(torch.full((1,), float(gate_init)))
        self.gate_post = nn.Parameter(torch.full((1,), float(gate_init)))
        self.gate_res = nn.Parameter(torch.full((1,), float(gate_init)))
        pre = 1.0 / n if n > 1 else 0.5
        self.bias_pre = nn.Parameter(torch.full((n,), math.log(pre / (1.0 - pre))))
        self.bias_post = nn.Parameter(torch.zeros(n))
        diag_logit = math.log(res_init_diag * (n - 1) / (1.0 - res_init_diag)) if n > 1 else 0.0
        self.bias_res = nn.Parameter(torch.eye(n) * diag_logit)

    def static_parameters(self) -> list[nn.Parameter]:
        return [self.bias_pre, self.bias_post, self.bias_res, self.gate_pre, self.gate_post, self.gate_res]

    def _coefficients_from_logits(self, pre: torch.Tensor, post: torch.Tensor, res: torch.Tensor):
        h_pre = torch.sigmoid(pre)  # (..., n)
        h_post = 2.0 * torch.sigmoid(post)  # (..., n)
        h_res = sinkhorn_knopp(res, self.sinkhorn_iters)  # (..., n, n)
        mix = torch.cat([h_pre.unsqueeze(-1), h_res.transpose(-2, -1)], dim=-1)  # [A_m | A_r] = [H_pre^T | H_res^T]
        return mix, h_post

    def static_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._coefficients_from_logits(self.bias_pre.float(), self.bias_post.float(), self.bias_res.float())

    def coefficients(self, H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if H is None:
            return self.static_coefficients()
        n = self.num_streams
        dtype = torch.promote_types(H.dtype, torch.float32)  # fp32 at least, also under autocast
        with torch.autocast(device_type=H.device.type, enabled=False):
            x = H.flatten(-2).to(dtype)  # vec(x), (..., n*C)
            inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
            proj = (x @ self.phi.to(dtype)) * inv_rms  # RMSNorm(x) phi, normalised after the matmul
            pre = self.gate_pre.to(dtype) * proj[..., :n] + self.bias_pre.to(dtype)
            post = self.gate_post.to(dtype) * proj[..., n : 2 * n] + self.bias_post.to(dtype)
            res = self.gate_res.to(dtype) * proj[..., 2 * n :].unflatten(-1, (n, n)) + self.bias_res.to(dtype)
            return self._coefficients_from_logits(pre, post, res)
