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
after it (a per-token scalar), which is the same function and saves a pass over ``n*C``. The coefficients are computed in
fp32 even under autocast.

Init (the paper leaves ``b`` and ``phi`` open; ours, chosen to start at the identity map):

* ``phi = 0`` and gates ``a = 0.01``: at step 0 the coefficients equal their biases, for every input;
* ``b_pre = logit(1/n)``: ``H_pre = 1/n``, so with identical streams the branch input is exactly ``h``;
* ``b_post = 0``: ``H_post = 1``, each stream receives the full branch output (as HC's ``B = 1``);
* ``b_res = c I`` with ``c = log(d (n-1) / (1-d))``: ``H_res`` is doubly stochastic with diagonal ``d``
  (``res_init_diag``, default 0.95) and off-diagonal ``(1-d)/(n-1)``.

Since all streams start equal and ``H_res`` has unit row sums, the network at init computes exactly the Pre-Norm
residual network, while ``H_res`` stays close to ``I`` so that streams, once they differ, are not averaged away.
For ``n = 1`` there is nothing to mix: ``H_pre`` starts at 0.5, which a Pre-Norm branch does not see.

Fused path (``fused=True``, the default; ``fused=False`` runs the plain autograd code above as the reference). Same
function, cheaper training step on CPU:

* the coefficients are computed token-last, ``(2n + n^2, tokens)``: every op on them (gates, sigmoid, the Sinkhorn
  sums and divisions over ``n``) then runs over contiguous rows of tokens instead of over tiny ``n``-sized inner dims,
  which costs several times less per op;
* the projection with its RMS normalisation (Eq. 7) is one autograd Function with an explicit backward: two matmuls
  (``grad x``, ``grad phi``) in their fast orientation, the normalisation's gradient term accumulated by the ``grad x``
  matmul, and nothing saved but the streams (kept by the width mix anyway), the ``(2n + n^2, tokens)`` projection and
  the per-token scale;
* Sinkhorn-Knopp (Eq. 9) is an autograd Function whose forward builds no graph and keeps only its output and the
  per-iteration column and row sums; its backward rebuilds the iterates from them and backpropagates through each
  normalisation analytically. It is the exact derivative of the unrolled iterations (not an implicit-function
  approximation), equal to autograd through :func:`sinkhorn_knopp` up to rounding. Both Functions are first-order
  only (double backward raises; the plain path supports it).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import Connection

__all__ = ["ManifoldHyperConnection", "sinkhorn_knopp", "sinkhorn_knopp_fused"]


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project ``exp(logits)`` (last two dims square) towards the doubly stochastic matrices (mHC Eq. 9).

    Each iteration normalises the columns, then the rows (Eq. 9: ``M_t = T_r(T_c(M_{t-1}))``). Differentiated by autograd
    through the unrolled iterations, so gradients are exact for the computed function. Subtracting the max first
    changes nothing (the normalisation is scale-invariant) but keeps ``exp`` finite.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


class _SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn-Knopp (mHC Eq. 9) with the matrix axes first: ``logits`` is ``(n, n, *batch)``, row ``i``, column ``j``.

    Same iterations as :func:`sinkhorn_knopp` (column-normalise, then row-normalise, ``iters`` times, after ``exp`` of
    the max-shifted logits). Batch axes last so that the sums over ``n`` and the broadcast divisions run over contiguous
    rows of the batch instead of over inner dims of size ``n``.

    Forward builds no graph and saves the output ``M_T`` and the normalisers: column sums ``c_t`` ``(iters, 1, n,
    *batch)`` and row sums ``r_t`` ``(iters, n, 1, *batch)``.

    Backward is the exact derivative of the unrolled iterations, carried in the log domain: with ``G = grad_M * M``
    (the gradient with respect to ``log M``), a normalisation ``out = m / s`` (``s`` the sums of ``m`` along an axis)
    has ``G_m = G_out - out * sum_axis(G_out)``, one reduction and one ``addcmul`` per step and no division. Since
    ``M_0 = exp(logits - max)``, the last ``G`` is the gradient of the logits. The iterates are rebuilt from the output
    in reverse, in place (``M_{t-1/2} = M_t r_t``, ``M_{t-1} = M_{t-1/2} c_t``): keeping or recomputing the list of
    them costs more in allocations than the arithmetic. They differ from forward's by rounding only (products of
    positive factors, a few ulps per iteration).

    The max shift gets no gradient: the first column normalisation makes the output invariant to it (``G_0`` sums to
    zero over every column), so autograd's term for it is zero up to rounding.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        m = torch.exp(logits - logits.amax(dim=(0, 1), keepdim=True))
        cols, rows = [], []
        for _ in range(iters):  # in place: nothing of forward is kept but the sums
            c = m.sum(dim=0, keepdim=True)
            m.div_(c)
            r = m.sum(dim=1, keepdim=True)
            m.div_(r)
            cols.append(c)
            rows.append(r)
        ctx.save_for_backward(m, torch.stack(cols), torch.stack(rows))
        return m

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        out, cols, rows = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            # gradient w.r.t. log M_T; grad arrives as a transposed view of the mix gradient, and G must be batch-last
            # contiguous for the in-place updates below to stay cheap
            G = grad.to(out.dtype).contiguous() * out
            m = out.clone()  # M_t, rebuilt backwards
            for t in reversed(range(cols.shape[0])):
                G.addcmul_(m, G.sum(dim=1, keepdim=True), value=-1.0)  # through the row normalisation: M_t
                m.mul_(rows[t])  # M_{t-1/2}
                G.addcmul_(m, G.sum(dim=0, keepdim=True), value=-1.0)  # through the column normalisation
                if t:
                    m.mul_(cols[t])  # M_{t-1}
            return G, None


def sinkhorn_knopp_fused(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """:func:`sinkhorn_knopp` (same signature, ``(..., n, n)``) through the analytic-backward Function above.

    Moves the batch axes last for the Function and back (two copies of ``(..., n, n)``); the mHC fused path calls the
    Function on a token-last layout directly.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    out = _SinkhornKnopp.apply(logits.movedim((-2, -1), (0, 1)).contiguous(), int(iters))
    return out.movedim((0, 1), (-2, -1))


class _RMSProjection(torch.autograd.Function):
    """``RMSNorm(x) phi`` (mHC Eq. 7, no affine), token-last: returns ``(phi^T x^T) * rstd`` of shape ``(K, tokens)``.

    ``H`` is ``(..., n, C)``, flattened to ``x = vec(H)`` of ``(tokens, D = n C)``; ``phi`` is ``(D, K)``. The
    normalisation is applied after the matmul (``rstd`` is a per-token scalar), so no normalised copy of ``x`` exists.
    Computed in ``promote(H.dtype, fp32)``; gradients are returned in the inputs' dtypes.

    The matmuls are skinny (``K = 2n + n^2`` columns against ``D`` in the thousands), and their orientation matters a
    lot for BLAS on CPU: forward is ``phi^T @ x^T``, ``grad phi^T = g' @ x``, ``grad x = g'^T @ phi^T`` with
    ``g' = g * rstd`` (``(K, tokens)`` contiguous; the transposes are views, which BLAS reads in place). Measured on a
    2-core EPYC, one thread, ``(1576, 1536) x (1536, 24)``: ``x^T @ g`` for the weight gradient takes 1.5x as long as
    ``g @ x``. With ``y = phi^T x^T`` and ``rstd = (|x|^2 / D + eps)^-1/2``,
    ``grad x = g'^T phi^T - (sum_k g y) rstd^3 / D * x``; the second term is written first and the matmul accumulates
    into it (``addmm_``), one pass over ``x`` less than adding it afterwards.

    Saves ``H`` (the width mix keeps it anyway), ``phi``, ``y`` and ``rstd``; ``x`` is re-flattened in backward.
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


class ManifoldHyperConnection(Connection):
    """mHC around one sublayer. See the module docstring for the equations and the init."""

    dynamic = True

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
    ) -> None:
        super().__init__("mhc", dim, rate, layer_index)
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
        if self.fused:
            return self._fused_coefficients(H)
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

    def _fused_coefficients(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 7-9 token-last (see the module docstring): the plain path's values up to rounding, cheaper on CPU."""
        n = self.num_streams
        lead = H.shape[:-2]
        dtype = torch.promote_types(H.dtype, torch.float32)  # fp32 at least, also under autocast
        with torch.autocast(device_type=H.device.type, enabled=False):
            proj = _RMSProjection.apply(H, self.phi, self.norm_eps)  # (2n + n^2, tokens) = (RMSNorm(x) phi)^T
            # [a_pre (n) | a_post (n) | a_res (n^2)] and [b_pre | b_post | vec(b_res)], one column per logit
            gate = torch.cat([self.gate_pre.expand(n), self.gate_post.expand(n), self.gate_res.expand(n * n)])
            bias = torch.cat([self.bias_pre, self.bias_post, self.bias_res.flatten()])
            logits = torch.addcmul(bias.to(dtype).unsqueeze(-1), gate.to(dtype).unsqueeze(-1), proj)
            gates = torch.sigmoid(logits[: 2 * n])  # (2n, tokens): H_pre, H_post / 2
            res = logits[2 * n :].view(n, n, proj.shape[-1])  # (n, n, tokens), row-major vec(H~_res) per token
            h_res = _SinkhornKnopp.apply(res, self.sinkhorn_iters)
            # [A_m | A_r] = [H_pre^T | H_res^T]: row i holds H_pre[i] and column i of H_res
            mix = torch.cat([gates[:n].unsqueeze(1), h_res.transpose(0, 1)], dim=1)  # (n, 1 + n, tokens)
            mix = mix.permute(2, 0, 1).contiguous().view(*lead, n, n + 1)
            h_post = (2.0 * gates[n:]).t().contiguous().view(*lead, n)
            return mix, h_post
