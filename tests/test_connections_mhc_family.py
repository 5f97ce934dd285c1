"""mHC-lite, KromHC and DeepSeek's mHC form, each against an independent computation.

* doubly stochastic to fp32 rounding for random parameters at any logit scale (mHC's Sinkhorn, for contrast, is not);
* mHC-lite: the whole connection against a token-by-token formula whose ``H_res`` sums permutation matrices
  enumerated here (by recursion, not itertools);
* KromHC: the same with ``H_res = torch.kron`` of its 2x2 factors;
* gradients against float64 finite differences (``torch.autograd.gradcheck``); every parameter gets a gradient from a
  loss on one output entry;
* Pre-Norm-exact at init; ``H_res`` near the identity at init; ``H_pre`` favours stream ``layer mod n`` at init (the
  symmetry between the streams is broken);
* DeepSeek's form (``hc_split_sinkhorn``: sigmoid + eps, 2 sigmoid, row softmax + eps, a column normalisation, then
  ``iters - 1`` row/column rounds, on ``comb`` = our ``H_res^T``), written here in DeepSeek's own layout.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hcvision.connections import build_connection, expand_streams, reduce_streams
from hcvision.connections.mhc import DEEPSEEK_EPS

REPO = Path(__file__).resolve().parents[1]
DIM = 6
EPS32 = torch.finfo(torch.float32).eps


def _randomize(conn: torch.nn.Module, seed: int, scale: float = 0.5, logit_scale: float = 1.0) -> None:
    """Random values for every parameter; the residual biases times ``logit_scale``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in conn.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (logit_scale if name == "bias_res"
                                                                                   else 1.0))
        for g in (conn.gate_pre, conn.gate_post, conn.gate_res):
            g.abs_().add_(0.1)


def _branch(seed: int, dim: int = DIM, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=dtype) / math.sqrt(dim)
    return lambda h: torch.tanh(torch.nn.functional.layer_norm(h, (dim,)) @ w.T)


# ---------------------------------------------------------------------------------------------------------
# Independent H_res constructions
# ---------------------------------------------------------------------------------------------------------
def _lex_permutations(items: list[int]) -> list[list[int]]:
    """All permutations in lexicographic order, by recursion."""
    if len(items) <= 1:
        return [list(items)]
    return [[first] + rest for i, first in enumerate(items) for rest in _lex_permutations(items[:i] + items[i + 1:])]


def _mhclite_h_res(logits: torch.Tensor, n: int) -> torch.Tensor:
    """``sum_sigma softmax(logits)_sigma P_sigma`` with ``P_sigma[i, sigma(i)] = 1``, one matrix at a time."""
    w = torch.exp(logits - logits.max())
    w = w / w.sum()
    out = torch.zeros(n, n, dtype=logits.dtype)
    for weight, sigma in zip(w, _lex_permutations(list(range(n)))):
        P = torch.zeros(n, n, dtype=logits.dtype)
        for i, j in enumerate(sigma):
            P[i, j] = 1.0
        out = out + weight * P
    return out


def _kromhc_h_res(logits: torch.Tensor, n: int) -> torch.Tensor:
    """``U_1 kron ... kron U_K`` with ``torch.kron``; ``p_k = e^{l_k0} / (e^{l_k0} + e^{l_k1})``."""
    out = torch.ones(1, 1, dtype=logits.dtype)
    for l0, l1 in logits.reshape(-1, 2):
        p = 1.0 / (1.0 + torch.exp(l1 - l0))
        out = torch.kron(out, torch.stack([torch.stack([p, 1 - p]), torch.stack([1 - p, p])]))
    assert out.shape == (n, n)
    return out


def _deepseek_split(mixes, scale, base, hc: int, iters: int, eps: float):
    """DeepSeek's ``hc_split_sinkhorn`` in its layout: ``comb[m, k]`` carries stream ``m`` into stream ``k``."""
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = torch.softmax(comb, dim=-1) + eps  # over the destinations of each source
    comb = comb / (comb.sum(-2, keepdim=True) + eps)  # each destination's weights
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


H_RES = {"mhclite": _mhclite_h_res, "kromhc": _kromhc_h_res}


def _direct(conn, H: torch.Tensor, branch) -> torch.Tensor:
    """mHC Eqs. 3, 7-8 token by token, ``H_res`` from this file's constructions:
    x_out = H_res x + H_post^T F(H_pre x)."""
    n = conn.num_streams
    out = torch.empty_like(H)
    flat_H, flat_out = H.reshape(-1, n, H.shape[-1]), out.view(-1, n, H.shape[-1])
    phi = conn.phi.detach().double()
    for t in range(flat_H.shape[0]):
        x = flat_H[t].double()
        v = x.reshape(-1)
        p = (v / torch.sqrt((v * v).mean() + conn.norm_eps)) @ phi
        pre = torch.sigmoid(conn.gate_pre.item() * p[:n] + conn.bias_pre.detach().double())
        post = 2 * torch.sigmoid(conn.gate_post.item() * p[n:2 * n] + conn.bias_post.detach().double())
        logits = conn.gate_res.item() * p[2 * n:] + conn.bias_res.detach().double().reshape(-1)
        h_res = H_RES[conn.kind](logits, n)
        y = branch(sum(pre[i] * x[i] for i in range(n)))
        for i in range(n):
            flat_out[t, i] = sum(h_res[i, j] * x[j] for j in range(n)) + post[i] * y
    return out


# ---------------------------------------------------------------------------------------------------------
# The connections against the direct formulas
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,rate", [("mhclite", 1), ("mhclite", 2), ("mhclite", 3), ("mhclite", 4),
                                       ("kromhc", 2), ("kromhc", 4), ("kromhc", 8)])
def test_matches_direct_formula(kind, rate):
    conn = build_connection(kind, DIM, rate, layer_index=1).double()
    _randomize(conn, seed=rate)
    H = torch.randn(2, 3, rate, DIM, dtype=torch.float64)
    branch = _branch(3)
    torch.testing.assert_close(conn(H, branch), _direct(conn, H, branch), rtol=1e-10, atol=1e-10)
    h, ctx = conn.width(H)  # the split call style computes the same
    torch.testing.assert_close(conn.depth(branch(h), ctx), conn(H, branch))


def test_parameter_shapes_follow_the_papers():
    lite, krom = build_connection("mhclite", DIM, 4, 0), build_connection("kromhc", DIM, 4, 0)
    assert lite.phi.shape == (4 * DIM, 2 * 4 + 24) and lite.bias_res.shape == (24,)  # n! = 24 logits
    assert krom.phi.shape == (4 * DIM, 2 * 4 + 4) and krom.bias_res.shape == (2, 2)  # K = log2 4 factors x 2
    assert not lite.fused and not krom.fused  # no fast path: the reference math runs


@pytest.mark.parametrize("kind,rate", [("mhclite", 2), ("mhclite", 3), ("mhclite", 4), ("mhclite", 5),
                                       ("kromhc", 2), ("kromhc", 4), ("kromhc", 8)])
@pytest.mark.parametrize("logit_scale", [0.1, 1.0, 10.0, 100.0, 1e4])
def test_doubly_stochastic_to_fp32_rounding_at_any_logit_scale(kind, rate, logit_scale):
    conn = build_connection(kind, 8, rate, 0)
    _randomize(conn, seed=rate, scale=1.0, logit_scale=logit_scale)
    H = torch.randn(64, rate, 8) * 3
    mix, _ = conn.coefficients(H)
    h_res = mix[..., 1:].transpose(-1, -2)  # A_r = H_res^T
    assert h_res.dtype == torch.float32 and torch.isfinite(h_res).all()
    assert (h_res >= 0).all()
    tol = 4 * rate * EPS32  # a sum of n (softmax-weighted) terms, each rounded once
    assert (h_res.sum(-1) - 1).abs().max() <= tol
    assert (h_res.sum(-2) - 1).abs().max() <= tol


def test_mhc_sinkhorn_is_not_exactly_doubly_stochastic():
    """The contrast the README quotes: 20 Sinkhorn rounds on random logits of std 3 leave sums a few 1e-2 off."""
    conn = build_connection("mhc", 8, 4, 0)
    _randomize(conn, seed=4, scale=1.0, logit_scale=3.0)
    h_res = conn.coefficients(torch.randn(256, 4, 8) * 3)[0][..., 1:].transpose(-1, -2)
    col_err = (h_res.sum(-2) - 1).abs().max()
    assert col_err > 1e-3  # Sinkhorn ends on rows, so the columns keep the residue
    assert (h_res.sum(-1) - 1).abs().max() <= 1e-5


@pytest.mark.parametrize("kind,rate", [("mhclite", 3), ("kromhc", 4)])
def test_gradients_match_finite_differences(kind, rate):
    conn = build_connection(kind, 3, rate, 0).double()
    _randomize(conn, seed=7)
    names = [name for name, _ in conn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in conn.parameters()]
    H = torch.randn(2, rate, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64)

    def f(H, *ps):
        return torch.func.functional_call(conn, dict(zip(names, ps)), (H, lambda h: torch.tanh(h @ w)))

    assert torch.autograd.gradcheck(f, (H, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,rate", [("mhclite", 2), ("mhclite", 4), ("kromhc", 2), ("kromhc", 4)])
def test_every_parameter_gets_a_gradient_from_one_output(kind, rate):
    conn = build_connection(kind, DIM, rate, 0)
    _randomize(conn, seed=5)
    H = torch.randn(2, 3, rate, DIM)
    lin = torch.nn.Linear(DIM, DIM)
    out = conn(H, lin)
    out[0, 0, 0, 0].backward()
    for name, p in conn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,rate", [("mhclite", 2), ("mhclite", 3), ("mhclite", 4), ("kromhc", 2),
                                       ("kromhc", 4), ("kromhc", 8)])
def test_init_is_prenorm_exact_and_h_res_near_identity(kind, rate):
    depth = 6
    branches = [_branch(100 + k) for k in range(depth)]
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    ref = x
    for T in branches:  # the Pre-Norm residual network
        ref = ref + T(ref)
    conns = [build_connection(kind, DIM, rate, k).double() for k in range(depth)]
    H = expand_streams(x, kind, rate)
    for conn, T in zip(conns, branches):
        H = conn(H, T)
    # Streams stay equal and each holds the residual stream; the read-out sums them (the final norm drops the n).
    # Tolerance: b_pre (the logits of weights summing to 1) is stored in fp32, so H_pre sums to 1 within ~1e-7; the
    # branch's LayerNorm removes the scale up to its eps (a ~1e-11 effect).
    torch.testing.assert_close(reduce_streams(H, kind), rate * ref, rtol=1e-10, atol=1e-10)
    h_res = conns[0].static_coefficients()[0][:, 1:].T.double()  # fp32 (the diagnostics' input)
    diag = torch.diagonal(h_res)
    if kind == "mhclite":
        torch.testing.assert_close(diag, torch.full((rate,), 0.95, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    else:  # KromHC: p = sigmoid(8) per factor
        torch.testing.assert_close(diag, torch.full((rate,), (1 / (1 + math.exp(-8.0))) ** int(math.log2(rate)),
                                                    dtype=torch.float64), rtol=1e-6, atol=1e-6)
        assert (h_res - torch.eye(rate, dtype=torch.float64)).abs().max() < 2e-3


@pytest.mark.parametrize("kind", ["mhc", "mhclite", "kromhc"])
@pytest.mark.parametrize("rate", [2, 4])
def test_init_h_pre_favours_stream_layer_mod_n(kind, rate):
    # The module docstring's init: sigmoid(1) on stream k mod n for sublayer k, the rest shared evenly, sum 1.
    p = 1 / (1 + math.exp(-1))
    for layer in range(rate + 1):
        conn = build_connection(kind, DIM, rate, layer)
        h_pre = conn.matrix()[1:, 0].double()  # A_m = H_pre^T, from the static coefficients
        expected = torch.full((rate,), (1 - p) / (rate - 1), dtype=torch.float64)
        expected[layer % rate] = p
        torch.testing.assert_close(h_pre, expected, rtol=1e-6, atol=1e-7)
        assert abs(h_pre.sum().item() - 1) < 1e-6
    symmetric = build_connection(kind, DIM, rate, 1, pre_init=1 / rate)  # the former init, for old runs
    torch.testing.assert_close(symmetric.matrix()[1:, 0], torch.full((rate,), 1 / rate))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, True, "0.7"])
def test_pre_init_outside_the_open_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"pre_init .* must lie in \(0, 1\), got"):
        build_connection("mhc", DIM, 2, 0, pre_init=bad)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
def test_rates_and_backends_outside_the_kinds_name_what_is_accepted():
    with pytest.raises(ValueError, match="at most 5 .*accepted: 1 to 5"):
        build_connection("mhclite", DIM, 6, 0)
    for rate in (1, 3, 6):
        with pytest.raises(ValueError, match=f"power of 2 of at least 2; got rate={rate}, accepted: 2, 4, 8"):
            build_connection("kromhc", DIM, rate, 0)
    with pytest.raises(ValueError, match="has no fast path; backend='torch' is not available, accepted: auto, "
                                         "reference"):
        build_connection("kromhc", DIM, 2, 0, backend="torch")
    with pytest.raises(ValueError, match="no fast path for form='deepseek'"):
        build_connection("mhc", DIM, 2, 0, form="deepseek", backend="triton")
    with pytest.raises(ValueError, match="unknown mhc form 'ds'; accepted: hcvision, deepseek"):
        build_connection("mhc", DIM, 2, 0, form="ds")
    with pytest.raises(ValueError, match="'sinkhorn_iters' does not apply to kind 'kromhc'; it is accepted by mhc"):
        build_connection("kromhc", DIM, 2, 0, sinkhorn_iters=3)


# ---------------------------------------------------------------------------------------------------------
# DeepSeek's form
# ---------------------------------------------------------------------------------------------------------
def _deepseek_reference(conn, H: torch.Tensor, branch, eps: float):
    """DeepSeek's pre/post/comb and ``hc_post`` from our parameters, translated to its layout (comb = H_res^T)."""
    n = conn.num_streams
    transpose = [2 * n + (c % n) * n + c // n for c in range(n * n)]  # comb[m, k] is our res[k, m]
    fn = torch.cat([conn.phi[:, :2 * n], conn.phi[:, transpose]], 1).detach().double()
    base = torch.cat([conn.bias_pre, conn.bias_post, conn.bias_res.T.reshape(-1)]).detach().double()
    scale = torch.cat([conn.gate_pre, conn.gate_post, conn.gate_res]).detach().double()
    flat = H.flatten(-2).double()
    mixes = (flat @ fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + conn.norm_eps)
    pre, post, comb = _deepseek_split(mixes, scale, base, n, conn.sinkhorn_iters, eps)
    y = branch(torch.sum(pre.unsqueeze(-1) * H, dim=-2))
    out = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.einsum("...mk,...mc->...kc", comb, H)
    return pre, post, comb, out


@pytest.mark.parametrize("rate", [2, 4])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_deepseek_form_reproduces_deepseeks_coefficients_and_output(rate, iters):
    conn = build_connection("mhc", DIM, rate, 0, form="deepseek", sinkhorn_iters=iters).double()
    assert not conn.fused
    _randomize(conn, seed=rate + iters, logit_scale=3.0)
    H = torch.randn(3, 4, rate, DIM, dtype=torch.float64)
    branch = _branch(11)
    pre, post, comb, out = _deepseek_reference(conn, H, branch, DEEPSEEK_EPS)
    mix, beta = conn.coefficients(H)
    torch.testing.assert_close(mix[..., 0], pre, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(beta, post, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(mix[..., 1:], comb, rtol=1e-12, atol=1e-13)  # A_r = comb
    torch.testing.assert_close(conn(H, branch), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_default_form_is_deepseeks_with_eps_zero(backend):
    """Same rounds in the same order once the layouts are matched; only DeepSeek's eps differs."""
    conn = build_connection("mhc", DIM, 4, 0, backend=backend).double()
    _randomize(conn, seed=2, logit_scale=3.0)
    H = torch.randn(3, 4, 4, DIM, dtype=torch.float64)
    branch = _branch(12)
    *_, out = _deepseek_reference(conn, H, branch, eps=0.0)
    torch.testing.assert_close(conn(H, branch), out, rtol=1e-11, atol=1e-11)
    *_, out_eps = _deepseek_reference(conn, H, branch, eps=DEEPSEEK_EPS)
    gap = (out_eps - out).abs().max().item()
    assert 0 < gap < 1e-4  # no softmax entry near eps here; entries near it move Sinkhorn's limit more (README)


def test_residue_script_reports_exact_kinds_at_rounding_and_mhc_off():
    """benchmarks/doubly_stochastic.py, whose table the README quotes (fewer samples here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doubly_stochastic", REPO / "benchmarks" / "doubly_stochastic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for kind in ("mhclite", "kromhc"):
        assert script.residue(kind, 4, 16.0, samples=256) <= 4 * 4 * EPS32
    assert script.residue("mhc", 4, 4.0, samples=256) > 1e-2
    assert script.residue("mhc", 4, 4.0, samples=256, sinkhorn_iters=200) < script.residue("mhc", 4, 4.0, samples=256)
