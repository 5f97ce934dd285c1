"""The connection math against independent, explicitly looped formulas written here from the papers.

HC: Hyper-Connections (arXiv 2409.19606) Eqs. 1-14, 17-19, App. B. FC: Frac-Connections (arXiv 2503.14125) Eqs. 6-15.
mHC: arXiv 2512.24880 Eqs. 3, 7-9.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hcvision.connections import (
    KINDS,
    HyperConnection,
    ManifoldHyperConnection,
    build_connection,
    expand_streams,
    extra_parameters,
    kinds_accepting,
    parallel_matrices,
    reduce_streams,
    sequential_matrices,
    sinkhorn_knopp,
)

DIM = 12


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _branch(seed: int, dim: int = DIM, dtype=torch.float64):
    """A random Pre-Norm sublayer T(h) = W2 gelu(W1 LN(h))."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(2 * dim, dim, generator=gen, dtype=dtype) / math.sqrt(dim)
    w2 = torch.randn(dim, 2 * dim, generator=gen, dtype=dtype) / math.sqrt(2 * dim)
    return lambda h: F.gelu(F.layer_norm(h, (h.shape[-1],)) @ w1.T) @ w2.T


# ---------------------------------------------------------------------------------------------------------
# Direct formulas (loops over streams / fractions, per token)
# ---------------------------------------------------------------------------------------------------------
def _direct_hc(conn: HyperConnection, H: torch.Tensor, branch) -> torch.Tensor:
    """Eqs. 2-5 with Eqs. 10-13 for dynamic kinds, token by token."""
    n, k = conn.num_streams, conn.num_inputs
    a_static = conn.static_alpha.detach()
    b_static = conn.static_beta.detach()
    out = torch.empty_like(H)
    flat_H = H.reshape(-1, n, H.shape[-1])
    flat_out = out.view(-1, n, H.shape[-1])
    for t in range(flat_H.shape[0]):
        Ht = flat_H[t]
        A = a_static.clone()
        B = b_static.clone()
        if conn.dynamic:
            W = conn.dynamic_weight.detach()
            W_in, W_r, W_b = W[:, :k], W[:, k : k + n], W[:, -1]
            s_a = conn.dynamic_alpha_scale.detach().item()
            s_b = conn.dynamic_beta_scale.detach().item()
            act = torch.tanh if conn.use_tanh else (lambda v: v)
            for i in range(n):
                norm = conn.norm
                hn = F.layer_norm(Ht[i], (Ht.shape[-1],), norm.weight.detach(), norm.bias.detach(), norm.eps)
                B[i] = B[i] + s_b * act(hn @ W_b)  # Eq. 11
                for j in range(k):
                    A[i, j] = A[i, j] + s_a * act(hn @ W_in[:, j])  # Eq. 12
                for j in range(n):
                    A[i, k + j] = A[i, k + j] + s_a * act(hn @ W_r[:, j])  # Eq. 13
        if k == 1:  # HC: one weighted sum in, B_j times the whole output out
            h_in = sum(A[i, 0] * Ht[i] for i in range(n))
            y = branch(h_in)
            for j in range(n):
                flat_out[t, j] = B[j] * y + sum(A[i, 1 + j] * Ht[i] for i in range(n))
        else:  # FC: fraction j of the input is sum_i Y_ij H_i; fraction j of the output is scaled by B_j
            h_in = torch.cat([sum(A[i, j] * Ht[i] for i in range(n)) for j in range(n)])
            y = branch(h_in).reshape(n, -1)
            for j in range(n):
                flat_out[t, j] = B[j] * y[j] + sum(A[i, n + j] * Ht[i] for i in range(n))
    return out


def _direct_sinkhorn(logits: np.ndarray, iters: int) -> np.ndarray:
    m = np.exp(logits)
    for _ in range(iters):
        for c in range(m.shape[1]):
            m[:, c] = m[:, c] / m[:, c].sum()
        for r in range(m.shape[0]):
            m[r, :] = m[r, :] / m[r, :].sum()
    return m


def _direct_mhc(conn: ManifoldHyperConnection, H: torch.Tensor, branch) -> torch.Tensor:
    """mHC Eqs. 3, 7-9 token by token: x_out = H_res x + H_post^T F(H_pre x)."""
    n = conn.num_streams
    out = torch.empty_like(H)
    flat_H = H.reshape(-1, n, H.shape[-1])
    flat_out = out.view(-1, n, H.shape[-1])
    phi = conn.phi.detach().double()
    for t in range(flat_H.shape[0]):
        x = flat_H[t].double()
        v = x.reshape(-1)
        v_norm = v / torch.sqrt((v * v).mean() + conn.norm_eps)  # RMSNorm over n*C
        p = v_norm @ phi
        pre = torch.sigmoid(conn.gate_pre.item() * p[:n] + conn.bias_pre.detach().double())
        post = 2 * torch.sigmoid(conn.gate_post.item() * p[n : 2 * n] + conn.bias_post.detach().double())
        res_logits = conn.gate_res.item() * p[2 * n :].reshape(n, n) + conn.bias_res.detach().double()
        h_res = torch.from_numpy(_direct_sinkhorn(res_logits.numpy(), conn.sinkhorn_iters))
        y = branch(sum(pre[i] * x[i] for i in range(n)).to(H.dtype))
        for i in range(n):
            flat_out[t, i] = (sum(h_res[i, j] * x[j] for j in range(n)) + post[i] * y).to(H.dtype)
    return out


@pytest.mark.parametrize("kind,tanh", [("shc", True), ("sfc", True), ("dhc", True), ("dhc", False),
                                       ("dfc", True), ("dfc", False)])
@pytest.mark.parametrize("rate", [2, 3])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_hc_fc_match_direct_formula(kind, rate, tanh, backend):
    options = {"tanh": tanh} if kind in ("dhc", "dfc") else {}
    conn = build_connection(kind, DIM, rate, layer_index=3, backend=backend, **options).double()
    _randomize(conn, seed=rate)
    n, c = conn.num_streams, conn.stream_dim
    H = torch.randn(2, 3, n, c, dtype=torch.float64)
    branch = _branch(7)
    torch.testing.assert_close(conn(H, branch), _direct_hc(conn, H, branch), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mhc_matches_direct_formula(rate, backend):
    conn = build_connection("mhc", DIM, rate, layer_index=1, backend=backend).double()
    _randomize(conn, seed=rate, scale=0.3)
    H = torch.randn(2, 3, rate, DIM, dtype=torch.float64)
    branch = _branch(3)
    torch.testing.assert_close(conn(H, branch), _direct_mhc(conn, H, branch), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_split_width_depth_equals_forward(kind):
    rate = 1 if kind == "residual" else 2
    conn = build_connection(kind, DIM, rate, 0)
    _randomize(conn)
    H = torch.randn(2, 5, *(conn.num_streams, conn.stream_dim))
    branch = _branch(1, dtype=torch.float32)
    h, ctx = conn.width(H)
    assert h.shape == (2, 5, DIM)
    torch.testing.assert_close(conn.depth(branch(h), ctx), conn(H, branch))


# ---------------------------------------------------------------------------------------------------------
# Init = Pre-Norm (HC Eq. 14, FC Eq. 15, our mHC init)
# ---------------------------------------------------------------------------------------------------------
def _stack_equivalence(kind: str, rate: int, depth: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    branches = [_branch(100 + k) for k in range(depth)]
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    ref = x
    # mHC with n = 1 starts at H_pre = sigmoid(0) = 0.5 (documented): its branch sees half the stream.
    in_scale = 0.5 if (kind == "mhc" and rate == 1) else 1.0
    for T in branches:  # Pre-Norm residual network
        ref = ref + T(in_scale * ref)
    conns = [build_connection(kind, DIM, rate, k).double() for k in range(depth)]
    H = expand_streams(x, kind, rate)
    for conn, T in zip(conns, branches):
        H = conn(H, T)
    return reduce_streams(H, kind), ref


@pytest.mark.parametrize("kind,rate", [(k, n) for k in ("shc", "dhc", "mhc") for n in (1, 2, 4, 8)]
                         + [(k, m) for k in ("sfc", "dfc") for m in (2, 4)] + [("residual", 1)])
def test_init_equals_prenorm_residual(kind, rate):
    out, ref = _stack_equivalence(kind, rate)
    if kind in ("sfc", "dfc", "residual"):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # fractions concatenate back exactly
    else:
        torch.testing.assert_close(out / rate, ref, rtol=1e-10, atol=1e-10)  # n identical streams, summed


def test_hc_init_matrix_is_eq14():
    n = 4
    for k in range(6):
        M = build_connection("dhc", DIM, n, k).matrix()
        expected = torch.zeros(n + 1, n + 1)
        expected[0, 1:] = 1
        expected[1 + k % n, 0] = 1
        expected[1:, 1:] = torch.eye(n)
        torch.testing.assert_close(M, expected)


def test_fc_init_matrix_is_eq15():
    m = 4
    M = build_connection("dfc", DIM, m, 5).matrix()
    expected = torch.zeros(m + 1, 2 * m)
    expected[0, m:] = 1
    expected[1:, :m] = torch.eye(m)
    expected[1:, m:] = torch.eye(m)
    torch.testing.assert_close(M, expected)


def test_mhc_init_coefficients():
    n, d = 4, 0.95
    conn = build_connection("mhc", DIM, n, 0, res_init_diag=d)
    M = conn.matrix(torch.randn(3, n, DIM))  # per token; phi = 0 so every token gives the biases
    assert M.shape == (3, n + 1, n + 1)
    torch.testing.assert_close(M[:, 0, 1:], torch.ones(3, n))  # H_post = 2 sigmoid(0) = 1
    p = 1 / (1 + math.exp(-1))  # H_pre: sigmoid(1) on stream 0 (layer 0 mod n), the rest shared by the others
    torch.testing.assert_close(M[:, 1:, 0], torch.tensor([p] + [(1 - p) / (n - 1)] * (n - 1)).expand(3, n))
    expected_res = torch.full((n, n), (1 - d) / (n - 1)) + torch.eye(n) * (d - (1 - d) / (n - 1))
    torch.testing.assert_close(M[0, 1:, 1:], expected_res)


def test_dynamic_matrix_per_token_matches_direct_coefficients():
    conn = build_connection("dhc", DIM, 2, 0).double()
    _randomize(conn, seed=5)
    H = torch.randn(4, 2, DIM, dtype=torch.float64)
    M = conn.matrix(H)
    assert M.shape == (4, 3, 3)
    # Recover the per-token matrix by probing the connection with unit branches: the first row (B) is the
    # response to a branch that outputs ones, with A_r^T H removed.
    ones = lambda h: torch.ones_like(h)  # noqa: E731
    zeros = lambda h: torch.zeros_like(h)  # noqa: E731
    beta = (conn(H, ones) - conn(H, zeros))[..., 0].float()
    torch.testing.assert_close(M[:, 0, 1:].float(), beta)


# ---------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (mHC Eq. 9)
# ---------------------------------------------------------------------------------------------------------
def test_sinkhorn_doubly_stochastic_and_matches_direct():
    # Seeded: 20 iterations leave column sums within 1e-5 of 1 for these logits, not for every draw (slow mixing).
    logits = torch.randn(5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    M = sinkhorn_knopp(logits, iters=20)
    assert (M >= 0).all()
    torch.testing.assert_close(M.sum(-1), torch.ones(5, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(M.sum(-2), torch.ones(5, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    for b in range(5):
        np.testing.assert_allclose(M[b].numpy(), _direct_sinkhorn(logits[b].numpy(), 20), rtol=1e-12)


def test_sinkhorn_gradcheck():
    logits = (torch.randn(2, 3, 3, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sinkhorn_knopp(z, 20), (logits,))


def test_mhc_coefficients_gradcheck():
    conn = build_connection("mhc", 4, 2, 0).double()
    _randomize(conn, seed=2)
    H = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    phi = conn.phi.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda H, phi: _functional_coeffs(conn, H, phi), (H, phi))


def _functional_coeffs(conn, H, phi):
    branch = _branch(9, dim=4)
    return torch.func.functional_call(conn, {"phi": phi}, (H, branch), strict=False, tie_weights=False)


def test_mhc_coefficients_fp32_under_autocast():
    conn = build_connection("mhc", DIM, 2, 0)
    H = torch.randn(2, 3, 2, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mix, beta = conn.coefficients(H.bfloat16())
    assert mix.dtype == torch.float32 and beta.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# Sequential / parallel duality (HC Eqs. 17-19, 53)
# ---------------------------------------------------------------------------------------------------------
def _stack_with_matrices(mats, branches, x, rate):
    H = expand_streams(x, "shc", rate)
    for k, (M, T) in enumerate(zip(mats, branches)):
        conn = build_connection("shc", DIM, rate, k).double()
        conn.set_matrix(M.double())
        H = conn(H, T)
    return reduce_streams(H, "shc")


def test_eq17_18_19_literal_matrices():
    seq = sequential_matrices(2, 1)[0]
    odd, even = parallel_matrices(2, 2)
    torch.testing.assert_close(seq, torch.tensor([[0.0, 1, 1], [1, 1, 0], [0, 0, 1]]))
    torch.testing.assert_close(odd, torch.tensor([[0.0, 1, 0], [1, 1, 1], [1, 1, 1]]))
    torch.testing.assert_close(even, torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]]))


@pytest.mark.parametrize("rate", [2, 3])
def test_sequential_matrices_reproduce_sequential_stack(rate):
    depth = 6
    branches = [_branch(200 + k) for k in range(depth)]
    x = torch.randn(3, DIM, dtype=torch.float64)
    ref = x
    for T in branches:
        ref = ref + T(ref)
    out = _stack_with_matrices(sequential_matrices(rate, depth), branches, x, rate)
    torch.testing.assert_close(out, rate * ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rate", [2, 3])
def test_parallel_matrices_reproduce_parallel_blocks(rate):
    groups = 3
    branches = [_branch(300 + k) for k in range(groups * rate)]
    x = torch.randn(3, DIM, dtype=torch.float64)
    ref = rate * x  # the sum of the initial streams
    for g in range(groups):  # Eq. 53: x_{g+1} = sum_i (T_{gn+i}(x_g) + x_g)
        ref = sum(branches[g * rate + i](ref) + ref for i in range(rate))
    out = _stack_with_matrices(parallel_matrices(rate, groups * rate), branches, x, rate)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # and it is not the sequential stack
    seq = _stack_with_matrices(sequential_matrices(rate, groups * rate), branches, x, rate)
    assert not torch.allclose(seq, out)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts (HC App. B Eqs. 21-25; FC Eqs. 16-19)
# ---------------------------------------------------------------------------------------------------------
def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_shc_param_count(n):
    assert _count(build_connection("shc", 64, n, 0)) == n * (n + 2) == extra_parameters("shc", 64, n)


def test_dhc_param_count_appendix_b_example():
    conn = build_connection("dhc", 2048, 4, 0, norm="layernorm", norm_affine=False)
    assert _count(conn) == 12_314  # |norm| = 0: 2048 * 6 + 4 * 6 + 2
    assert extra_parameters("dhc", 2048, 4, norm_params=0) == 12_314
    affine = build_connection("dhc", 2048, 4, 0)
    assert _count(affine) == 12_314 + 2 * 2048 == extra_parameters("dhc", 2048, 4)


def test_fc_param_counts():
    d, m = 2048, 4
    assert _count(build_connection("sfc", d, m, 0)) == m * (2 * m + 1)
    dfc = build_connection("dfc", d, m, 0, norm="rmsnorm")
    # FC Eqs. 18-19 with an RMSNorm of d/m weights: d/m + d/m (2m + 1) + m (2m + 1) + 2
    assert _count(dfc) == d // m + d // m * (2 * m + 1) + m * (2 * m + 1) + 2 == extra_parameters("dfc", d, m, d // m)


def test_mhc_param_count():
    n, C = 4, 64
    assert _count(build_connection("mhc", C, n, 0)) == n * C * (n * n + 2 * n) + n * n + 2 * n + 3


# ---------------------------------------------------------------------------------------------------------
# Weight decay groups, layout and bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_digits_patch2_8_dhc2", "vit_digits_patch2_8_mhc2", "dit_digits_2_dfc2"])
def test_weight_decay_static_none_dynamic_decayed_through_the_engine(name):
    """The paper's rule as the training engine applies it (engine.build_optimizer over model.no_weight_decay()):
    static connection parameters get none, the dynamic projections the configured decay."""
    import timm

    import hcvision  # noqa: F401
    from hcvision.engine import build_optimizer
    from hcvision.engine.config import BaseTrainConfig

    model = timm.create_model(name)
    opt = build_optimizer(model, BaseTrainConfig(weight_decay=0.3))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    conn = model.blocks[0].attn_conn
    assert conn.static_parameters()
    for p in conn.static_parameters():
        assert decay_of[id(p)] == 0.0
    dynamic = conn.phi if name.endswith("mhc2") else conn.dynamic_weight
    assert decay_of[id(dynamic)] == 0.3
    assert decay_of[id(model.blocks[0].mlp.fc1.weight)] == 0.3


def test_streams_are_views_next_to_channels():
    x = torch.randn(2, 5, DIM)
    H = expand_streams(x, "shc", 4)
    assert H.shape == (2, 5, 4, DIM) and H.data_ptr() == x.data_ptr()
    F_ = expand_streams(x, "sfc", 4)
    assert F_.shape == (2, 5, 4, DIM // 4) and F_.data_ptr() == x.data_ptr()
    torch.testing.assert_close(reduce_streams(F_, "sfc"), x)
    torch.testing.assert_close(reduce_streams(H, "shc"), 4 * x)


@pytest.mark.parametrize(
    "args,match",
    [
        (("hyper", DIM, 2, 0), "accepted: residual, shc, dhc, sfc, dfc, mhc"),
        (("dhc", DIM, 0, 0), "rate must be an integer >= 1"),
        (("sfc", 10, 4, 0), "not divisible by 4"),
        (("residual", DIM, 2, 0), "accepted: 1"),
        (("shc", DIM, 2, -1), "layer_index"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_connection(*args)


def test_unknown_option_names_accepted_ones():
    with pytest.raises(ValueError, match="unknown connection option 'tahn'; accepted: .*tanh"):
        build_connection("dhc", DIM, 2, 0, tahn=False)


@pytest.mark.parametrize("kind,option,value", [("shc", "tanh", False), ("sfc", "scale_init", 0.1),
                                               ("dhc", "sinkhorn_iters", 3), ("mhc", "norm", "rmsnorm"),
                                               ("residual", "backend", "torch"), ("residual", "fused", True)])
def test_option_of_another_kind_is_an_error_naming_the_kinds_that_use_it(kind, option, value):
    users = kinds_accepting(option)
    assert users and kind not in users
    with pytest.raises(ValueError, match=f"{option!r} does not apply to kind {kind!r}; it is accepted by "
                                         f"{', '.join(users)}"):
        build_connection(kind, DIM, 1 if kind == "residual" else 2, 0, **{option: value})


def test_backend_is_resolved_once_at_construction():
    from hcvision.connections import kernels

    conn = build_connection("dhc", DIM, 2, 0, backend="torch")
    assert conn.fused and conn._impl is kernels.select("dynamic", "torch")
    assert not build_connection("dhc", DIM, 2, 0, fused=False).fused
    assert build_connection("mhc", DIM, 2, 0, backend="reference")._impl is None
    with pytest.raises(ValueError, match="accepted: auto, reference, torch, triton"):
        build_connection("shc", DIM, 2, 0, backend="cuda")
    with pytest.raises(ValueError, match="contradicts"):
        build_connection("shc", DIM, 2, 0, fused=False, backend="torch")
    kernels.set_backend("reference")
    try:
        assert not build_connection("shc", DIM, 2, 0).fused  # auto follows set_backend
        assert build_connection("shc", DIM, 2, 0, backend="torch").fused  # an explicit argument wins
    finally:
        kernels.set_backend(None)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_forward_backward(kind):
    """Mixed precision (the paper recipes use bf16): gradients flow with fp32 streams and bf16 branches."""
    rate = 1 if kind == "residual" else 2
    conns = [build_connection(kind, DIM, rate, k) for k in range(2)]
    lin = torch.nn.Linear(DIM, DIM)
    x = torch.randn(2, 3, DIM, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H = expand_streams(x, kind, rate)
        for conn in conns:
            H = conn(H, lin)
        loss = reduce_streams(H, kind).float().pow(2).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for c in conns for p in c.parameters())
