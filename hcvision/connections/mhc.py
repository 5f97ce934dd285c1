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

Init (the paper leaves ``b`` and ``phi`` open; ours starts at the Pre-Norm residual network and breaks the tie
between the streams):

* ``phi = 0`` and gates ``a = 0.01``: at step 0 the coefficients equal their biases, for every input;
* ``b_pre``: sublayer ``k`` favours stream ``k mod n``, as HC's ``A_m = e_{k mod n}`` (HC Eq. 14):
  ``H_pre = p`` on that stream and ``(1-p)/(n-1)`` on each other one (``pre_init = p``, default
  :data:`PRE_INIT` ``= sigmoid(1) ~ 0.731``). The weights sum to 1, so with identical streams the branch input is
  exactly ``h``;
* ``b_post = 0``: ``H_post = 1``, each stream receives the full branch output (as HC's ``B = 1``);
* ``b_res = c I`` with ``c = log(d (n-1) / (1-d))``: ``H_res`` is doubly stochastic with diagonal ``d``
  (``res_init_diag``, default 0.95) and off-diagonal ``(1-d)/(n-1)``.

Since all streams start equal and ``H_res`` has unit row sums, the network at init computes exactly the Pre-Norm
residual network, while ``H_res`` stays close to ``I`` so that streams, once they differ, are not averaged away.

Why ``H_pre`` is not uniform: the streams start as ``n`` copies of the embedding, and with ``H_pre = 1/n`` on every
stream (this project's init before the change; ``pre_init = 1/n`` gives it back) every map above treats the streams
alike, so the network is symmetric under permuting them: equal streams get equal gradients and, in exact arithmetic,
stay equal for ever (a residual network with a few scalars). In fp32 only rounding differences set them apart, slowly
(digits ``mhc2``, one seed: stream cosine exactly 1.0 after one epoch). Favouring one stream per sublayer makes the
gradient reaching stream ``i`` carry ``H_pre,i`` times the branch input's gradient, so the streams' ``H_post`` (of
every sublayer but the last) and ``phi`` already move differently in the first step, and the streams then separate.
(``H_pre`` itself gets almost no gradient while the streams are equal: a Pre-Norm branch does not see the scale of its
input.)

Why ``p = sigmoid(1)``: HC's one-hot (``p = 1``) is out of reach of a sigmoid, and near it the other entries' sigmoids
saturate (``dH/db = H (1 - H)``) and barely learn. Public mHC-family code breaks the tie the same way, with a
layer-dependent favoured stream at logit ``+1``: the KromHC authors' code (``wz1119/KromHC``, ``hyper_conn/Kromhc.py``)
puts pre logits ``+1`` on stream ``layer_index mod n`` and ``-1`` on the others (a random stream when no layer index is
given), and the ``hyper-connections`` package's mHC (``lucidrains/hyper-connections``) ``+1`` and ``0``. For ``n = 2``
KromHC's is exactly ``p = sigmoid(1)`` with weights summing to 1; for ``n > 2`` both sum to more than 1, which would
scale the branch input, so we keep the favoured weight and share ``1 - p`` among the others. (KromHC also starts
``H_post`` at ``2 sigmoid(+-1)``; we keep ``H_post = 1``, HC's ``B = 1``.) mHC's paper leaves the biases' init open.
For ``n = 1`` there is nothing to mix: ``H_pre`` starts at 0.5, which a Pre-Norm branch does not see.

Sinkhorn-Knopp runs in the log domain (``L <- L - logsumexp(L)`` over columns, then rows), the same iterations as
normalising ``exp(L)``, but finite for any finite logits: in fp32 on ``exp(logits - max)`` a whole column underflows
once the logit spread passes ~170 and the next division gives NaN.

DeepSeek's form (``form="deepseek"``; DeepSeek-V3.2/V4's ``hc_split_sinkhorn``, as reproduced by public inference
engines) differs in three places: ``H_pre = sigmoid + eps``; the first step is a softmax plus ``eps`` instead of
``exp``; every later normalisation divides by ``sum + eps``. It stores the residual mix as ``comb = H_res^T`` (``comb[m,
n]``: from stream ``m`` to stream ``n``), so its row softmax is our column normalisation ``T_c`` and its last step, a
column normalisation of ``comb``, is our ``T_r``: the order of the rounds is the same. With ``eps = 0`` the two forms
are the same function (``tests/test_connections_mhc_family.py``); with it, ``eps`` floors the softmax entries, which
moves Sinkhorn's limit where an entry is near ``eps`` (by up to a few 1e-3 for random parameters). The default keeps
the paper's Eq. 9 (``exp``, no ``eps``): the log-domain iterations need no ``eps`` to stay finite, and the fast paths
compute that form.

The fast paths (token-last coefficients with analytic backwards, the Triton coefficient kernel) are in
:mod:`hcvision.connections.kernels` and are tested against this module; ``form="deepseek"`` runs the reference path.

:class:`ManifoldConnection` holds what mHC shares with its exactly doubly stochastic variants (``mhc_exact.py``):
the flattened RMSNorm, the fused projection, ``H_pre`` and ``H_post``; a subclass says how ``H_res`` is made from its
logits.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import kinds
from .base import Connection
from .hyper import COMMON_OPTIONS, FAST_OPTIONS

__all__ = ["ManifoldConnection", "ManifoldHyperConnection", "sinkhorn_knopp", "sinkhorn_deepseek", "MHC_FORMS",
           "DEEPSEEK_EPS", "PRE_INIT", "initial_pre_mix", "manifold_parameters"]

MHC_FORMS: tuple[str, ...] = ("hcvision", "deepseek")
DEEPSEEK_EPS = 1e-6  # DeepSeek's hc_eps
PRE_INIT = 1.0 / (1.0 + math.exp(-1.0))  # sigmoid(1): H_pre's favoured weight at init (module docstring)


def initial_pre_mix(rate: int, layer_index: int, favoured: float = PRE_INIT) -> torch.Tensor:
    """``H_pre`` at init for sublayer ``layer_index``: ``favoured`` on stream ``layer_index mod n`` and
    ``(1 - favoured) / (n - 1)`` on the others (sum 1); ``0.5`` for ``n = 1``. See the module docstring."""
    if rate == 1:
        return torch.full((1,), 0.5, dtype=torch.float64)
    h_pre = torch.full((rate,), (1.0 - favoured) / (rate - 1), dtype=torch.float64)
    h_pre[layer_index % rate] = favoured
    return h_pre


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


def sinkhorn_deepseek(logits: torch.Tensor, iters: int = 20, eps: float = DEEPSEEK_EPS) -> torch.Tensor:
    """DeepSeek's Sinkhorn, written for ``H_res`` (rows: output streams; DeepSeek's ``comb`` is the transpose).

    A softmax over each column plus ``eps`` (DeepSeek: row softmax of ``comb``), a row normalisation by ``sum + eps``,
    then ``iters - 1`` rounds of column and row normalisation by ``sum + eps``. ``eps = 0`` gives
    :func:`sinkhorn_knopp` (same rounds, in the linear domain).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    m = torch.softmax(logits, dim=-2) + eps
    m = m / (m.sum(dim=-1, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m


class ManifoldConnection(Connection):
    """mHC's shared parametrisation (module docstring): ``x~ = RMSNorm(vec(x))``, one fused projection ``phi``,
    ``H_pre = sigmoid``, ``H_post = 2 sigmoid``, each with a scalar gate ``alpha`` and a bias ``b``; a subclass turns
    the residual logits (shape of ``bias_res``) into ``H_res`` (:meth:`residual_mix`).

    At init ``phi = 0`` (the coefficients equal their biases for every input), ``H_pre`` puts ``pre_init`` on stream
    ``layer_index mod n`` and the rest evenly on the others (:func:`initial_pre_mix`; this breaks the symmetry between
    the streams) and ``H_post = 1``; a subclass makes ``H_res`` near the identity with unit row sums, so with equal
    streams the network computes the Pre-Norm residual network.
    """

    def __init__(self, kind: str, dim: int, rate: int, layer_index: int, *, gate_init: float = 0.01,
                 norm_eps: float = 1e-6, pre_init: float = PRE_INIT, **common: Any) -> None:
        if isinstance(pre_init, bool) or not isinstance(pre_init, (int, float)) or not 0.0 < pre_init < 1.0:
            raise ValueError(f"pre_init (H_pre's weight on stream layer_index mod n at init) must lie in (0, 1), "
                             f"got {pre_init!r}; {PRE_INIT:.4f} by default, 1/n for the symmetric init")
        super().__init__(kind, dim, rate, layer_index, **common)
        self.pre_init = float(pre_init)
        n = self.num_streams
        self.norm_eps = float(norm_eps)
        res_bias = self.initial_res_bias()
        # Fused phi = [phi_pre | phi_post | phi_res] over vec(x) in R^{nC}.
        self.phi = nn.Parameter(torch.zeros(n * dim, 2 * n + res_bias.numel()))
        self.gate_pre = nn.Parameter(torch.full((1,), float(gate_init)))
        self.gate_post = nn.Parameter(torch.full((1,), float(gate_init)))
        self.gate_res = nn.Parameter(torch.full((1,), float(gate_init)))
        self.bias_pre = nn.Parameter(torch.logit(initial_pre_mix(n, layer_index, self.pre_init)).float())
        self.bias_post = nn.Parameter(torch.zeros(n))
        self.bias_res = nn.Parameter(res_bias)

    # --- what a subclass defines --------------------------------------------------------------------------------
    def initial_res_bias(self) -> torch.Tensor:
        """``b_res`` at init (its shape is the shape of the residual logits)."""
        raise NotImplementedError

    def residual_mix(self, res: torch.Tensor) -> torch.Tensor:
        """``H_res`` ``(..., n, n)`` (rows: output streams) from logits ``(..., *bias_res.shape)``."""
        raise NotImplementedError

    def pre_mix(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pre)

    # --- shared -------------------------------------------------------------------------------------------------
    def static_parameters(self) -> list[nn.Parameter]:
        return [self.bias_pre, self.bias_post, self.bias_res, self.gate_pre, self.gate_post, self.gate_res]

    def dynamic_scale_parameters(self) -> list[nn.Parameter]:
        return [self.gate_pre, self.gate_post, self.gate_res]

    def residual_logits(self) -> torch.Tensor:
        """``b_res`` as one group (mHC's ``n^2`` Sinkhorn logits, mHC-lite's ``n!`` softmax logits)."""
        return self.bias_res.detach().float().reshape(1, -1)

    def _coefficients_from_logits(self, pre: torch.Tensor, post: torch.Tensor, res: torch.Tensor):
        h_pre = self.pre_mix(pre)  # (..., n)
        h_post = 2.0 * torch.sigmoid(post)  # (..., n)
        h_res = self.residual_mix(res)  # (..., n, n)
        mix = torch.cat([h_pre.unsqueeze(-1), h_res.transpose(-2, -1)], dim=-1)  # [A_m | A_r] = [H_pre^T | H_res^T]
        return mix, h_post

    def static_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._coefficients_from_logits(self.bias_pre.float(), self.bias_post.float(), self.bias_res.float())

    @classmethod
    def stacked_static_coefficients(cls, conns: list[Connection]) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers' biases through one batched ``H_res`` (one Sinkhorn for all layers instead of one per layer)."""
        logits = [torch.stack([getattr(c, name).detach().float() for c in conns])
                  for name in ("bias_pre", "bias_post", "bias_res")]
        return conns[0]._coefficients_from_logits(*logits)

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
            res = (self.gate_res.to(dtype) * proj[..., 2 * n :].unflatten(-1, tuple(self.bias_res.shape))
                   + self.bias_res.to(dtype))
            return self._coefficients_from_logits(pre, post, res)


class ManifoldHyperConnection(ManifoldConnection):
    """mHC around one sublayer: ``H_res`` by Sinkhorn-Knopp. See the module docstring for the equations and the init.

    ``form``: ``"hcvision"`` (default, the paper's Eq. 9, log domain) or ``"deepseek"`` (DeepSeek's eps placement;
    reference path only).
    """

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
        form: str = "hcvision",
        **common: Any,
    ) -> None:
        if not 0.0 < res_init_diag < 1.0 and rate > 1:
            raise ValueError(f"res_init_diag must lie in (0, 1), got {res_init_diag}")
        if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be an integer >= 1, got {sinkhorn_iters!r}")
        if form not in MHC_FORMS:
            raise ValueError(f"unknown mhc form {form!r}; accepted: {', '.join(MHC_FORMS)}")
        self.sinkhorn_iters, self.res_init_diag, self.form = int(sinkhorn_iters), float(res_init_diag), form
        super().__init__("mhc", dim, rate, layer_index, gate_init=gate_init, norm_eps=norm_eps, **common)

    def fast_path_family(self) -> Optional[str]:
        return self.record.family if self.form == "hcvision" else None

    def _no_fast_path_reason(self) -> str:
        return f" for form={self.form!r}"

    def initial_res_bias(self) -> torch.Tensor:
        # b_res = c I, c = log(d (n-1) / (1-d)): H_res is doubly stochastic with diagonal d, off-diagonal (1-d)/(n-1).
        n, d = self.num_streams, self.res_init_diag
        return torch.eye(n) * (math.log(d * (n - 1) / (1.0 - d)) if n > 1 else 0.0)

    def pre_mix(self, pre: torch.Tensor) -> torch.Tensor:
        h_pre = torch.sigmoid(pre)
        return h_pre + DEEPSEEK_EPS if self.form == "deepseek" else h_pre

    def residual_mix(self, res: torch.Tensor) -> torch.Tensor:
        if self.form == "deepseek":
            return sinkhorn_deepseek(res, self.sinkhorn_iters)
        return sinkhorn_knopp(res, self.sinkhorn_iters)


def manifold_parameters(res_logits: Callable[[int], int]) -> Callable[[int, int, Optional[int]], int]:
    """Closed-form count of an mHC-family connection with ``R = res_logits(n)`` residual logits:
    ``nC(2n + R)`` (phi) ``+ 2n + R`` (biases) ``+ 3`` (gates). mHC: ``R = n^2``."""
    def count(dim: int, rate: int, norm_params: Optional[int] = None) -> int:
        r = res_logits(rate)
        return rate * dim * (2 * rate + r) + 2 * rate + r + 3
    return count


MANIFOLD_OPTIONS = ("gate_init", "norm_eps", "pre_init")
kinds.register(kinds.KindRecord(
    name="mhc", title="manifold-constrained Hyper-Connections", layout="copies", dynamic=True,
    build=ManifoldHyperConnection, family="mhc",
    options=("gate_init", "sinkhorn_iters", "res_init_diag", "norm_eps", "pre_init", "form") + FAST_OPTIONS
    + COMMON_OPTIONS,
    extra_parameters=manifold_parameters(lambda n: n * n)))
