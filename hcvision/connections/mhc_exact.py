"""mHC with an exactly doubly stochastic residual mix: mHC-lite and KromHC.

Both keep mHC's ``H_pre = sigmoid``, ``H_post = 2 sigmoid``, the flattened RMSNorm and the one fused projection
(:class:`~hcvision.connections.mhc.ManifoldConnection`, dynamic per token) and replace the Sinkhorn iterations, whose
20 rounds leave row and column sums off by up to a few hundredths at ordinary logit scales, by a parametrisation that
is doubly stochastic by construction (to the rounding of the dtype, at any logit scale):

* **mHC-lite** (arXiv 2601.05732, Thm 4.1 / Eq. 26): ``H_res = sum_sigma a_sigma P_sigma`` over the ``n!`` permutation
  matrices, ``a = softmax(alpha_res * x~ W_res + b_res)``. Every convex combination of permutation matrices is doubly
  stochastic (and by Birkhoff-von Neumann every doubly stochastic matrix is one). The projection has ``n!`` residual
  columns, so ``n`` is capped at :data:`MHCLITE_MAX_STREAMS` (5! = 120 columns; 6! = 720 would outgrow the rest).
* **KromHC** (arXiv 2601.21579): ``H_res = U_1 kron ... kron U_K``, ``K = log2 n``, ``U_k = [[p_k, 1-p_k], [1-p_k,
  p_k]]`` with ``(p_k, 1-p_k) = softmax`` of two logits per factor: the Kronecker product of doubly stochastic
  matrices is doubly stochastic. ``n`` must be a power of 2 (at least 2); the projection has ``2K`` residual columns.

``P_sigma[i, j] = 1`` iff ``j = sigma(i)`` (``sigma`` in ``itertools.permutations`` order, the identity first), and
``H_res`` acts as in mHC: ``x_out = H_res x + H_post^T F(H_pre x)`` (rows: output streams).

Init: ``phi = 0``, gates 0.01 and ``H_pre`` favouring stream ``layer_index mod n`` (``pre_init``) as mHC, so at step 0
the coefficients equal their biases and the streams do not stay tied (see :mod:`.mhc`). mHC-lite: ``b_res`` puts
weight ``a_id`` on the identity and the rest evenly on the other permutations, with ``a_id`` chosen so that the diagonal
of ``H_res`` is ``res_init_diag`` (0.95, as mHC). KromHC: each factor's biases start at ``(res_init_logit, 0)`` (the
KromHC code's ``(0, -8)``, shifted), so ``p_k = sigmoid(8)`` and ``H_res`` starts within ``1e-3`` of ``I``. Unit row
sums and equal streams make both start as the Pre-Norm residual network, as mHC.

No fast path: these kinds run the reference path (``backend`` accepts ``auto`` and ``reference``).
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from . import kinds
from .hyper import COMMON_OPTIONS, FAST_OPTIONS
from .mhc import MANIFOLD_OPTIONS, ManifoldConnection, manifold_parameters

__all__ = ["MHCLiteConnection", "KromHCConnection", "permutation_matrices", "kron_factors", "MHCLITE_MAX_STREAMS"]

MHCLITE_MAX_STREAMS = 5


def permutation_matrices(n: int) -> torch.Tensor:
    """The ``n!`` permutation matrices ``(n!, n, n)``, ``P[s, i, sigma_s(i)] = 1``, the identity first."""
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    return torch.eye(n)[perms]


def kron_factors(factors: torch.Tensor) -> torch.Tensor:
    """``U_1 kron U_2 kron ... kron U_K`` for factors ``(..., K, a, a)`` (batched over the leading dims)."""
    out = factors[..., 0, :, :]
    for k in range(1, factors.shape[-3]):
        u = factors[..., k, :, :]
        rows, cols = out.shape[-2] * u.shape[-2], out.shape[-1] * u.shape[-1]
        out = (out[..., :, None, :, None] * u[..., None, :, None, :]).reshape(*out.shape[:-2], rows, cols)
    return out


def _check_mhclite_rate(rate: int) -> None:
    if rate > MHCLITE_MAX_STREAMS:
        raise ValueError(f"mhclite mixes the n! permutation matrices, so n is at most {MHCLITE_MAX_STREAMS} "
                         f"({MHCLITE_MAX_STREAMS}! = {math.factorial(MHCLITE_MAX_STREAMS)} logits); got rate={rate}, "
                         f"accepted: 1 to {MHCLITE_MAX_STREAMS}")


def _check_kromhc_rate(rate: int) -> None:
    if rate < 2 or rate & (rate - 1):  # n = 1 would leave alpha_res without a use (and has nothing to mix)
        raise ValueError(f"kromhc builds H_res from 2x2 Kronecker factors, so n must be a power of 2 of at least 2; "
                         f"got rate={rate}, accepted: 2, 4, 8, 16, ...")


class MHCLiteConnection(ManifoldConnection):
    """mHC-lite around one sublayer: ``H_res`` a softmax-weighted sum of the ``n!`` permutation matrices."""

    def __init__(self, dim: int, rate: int, layer_index: int, *, res_init_diag: float = 0.95,
                 **options: Any) -> None:
        if not 0.0 < res_init_diag < 1.0 and rate > 1:
            raise ValueError(f"res_init_diag must lie in (0, 1), got {res_init_diag}")
        self.res_init_diag = float(res_init_diag)
        super().__init__("mhclite", dim, rate, layer_index, **options)
        self.register_buffer("permutations", permutation_matrices(self.num_streams), persistent=False)

    def initial_res_bias(self) -> torch.Tensor:
        n = self.num_streams
        bias = torch.zeros(math.factorial(n))
        if n > 1:
            # Weight u on each non-identity permutation, a_id = 1 - (n! - 1) u on the identity. A diagonal entry
            # gets a_id plus u from each of the (n-1)! - 1 other permutations fixing it; set that to d.
            u = (1.0 - self.res_init_diag) / (math.factorial(n) - math.factorial(n - 1))
            bias[0] = math.log((1.0 - (math.factorial(n) - 1) * u) / u)
        return bias

    def residual_mix(self, res: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(res, dim=-1)  # (..., n!)
        return torch.einsum("...s,sij->...ij", weights, self.permutations.to(weights.dtype))


class KromHCConnection(ManifoldConnection):
    """KromHC around one sublayer: ``H_res`` the Kronecker product of ``log2 n`` doubly stochastic 2x2 factors."""

    def __init__(self, dim: int, rate: int, layer_index: int, *, res_init_logit: float = 8.0,
                 **options: Any) -> None:
        self.res_init_logit = float(res_init_logit)
        super().__init__("kromhc", dim, rate, layer_index, **options)

    def initial_res_bias(self) -> torch.Tensor:
        factors = self.num_streams.bit_length() - 1  # K = log2 n
        bias = torch.zeros(factors, 2)
        bias[:, 0] = self.res_init_logit  # the identity's logit leads: p_k = sigmoid(res_init_logit)
        return bias

    def residual_logits(self) -> torch.Tensor:
        return self.bias_res.detach().float().reshape(-1, 2)  # one softmax per factor

    def residual_mix(self, res: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(res, dim=-1)  # (..., K, 2): (p_k, 1 - p_k)
        p, q = w[..., 0], w[..., 1]
        factors = torch.stack([torch.stack([p, q], -1), torch.stack([q, p], -1)], -2)  # (..., K, 2, 2)
        return kron_factors(factors)


kinds.register(kinds.KindRecord(
    name="mhclite", title="mHC-lite, permutation-mixture Hyper-Connections", layout="copies", dynamic=True,
    build=MHCLiteConnection, options=MANIFOLD_OPTIONS + ("res_init_diag",) + FAST_OPTIONS + COMMON_OPTIONS,
    extra_parameters=manifold_parameters(math.factorial), rate_rule=_check_mhclite_rate))
kinds.register(kinds.KindRecord(
    name="kromhc", title="KromHC, Kronecker-product Hyper-Connections", layout="copies", dynamic=True,
    build=KromHCConnection, options=MANIFOLD_OPTIONS + ("res_init_logit",) + FAST_OPTIONS + COMMON_OPTIONS,
    extra_parameters=manifold_parameters(lambda n: 2 * (n.bit_length() - 1)), rate_rule=_check_kromhc_rate))
