"""The fused mHC coefficient path (analytic Sinkhorn and RMS-projection backwards) against plain autograd, float64.

``tests/test_connections_fast.py`` compares whole fused and plain connections; this file checks the two autograd
Functions of ``hcvision/connections/kernels/mhc_torch.py`` on their own, at spreads and iteration counts where a wrong
backward would show, plus autocast and what the Sinkhorn Function keeps for backward. No timing here.
"""
from __future__ import annotations

import pytest
import torch

from hcvision.connections import build_connection, sinkhorn_knopp
from hcvision.connections.kernels.mhc_torch import (
    _RMSProjection,
    _SinkhornKnopp,
    mhc_coefficients,
    sinkhorn_knopp_fused,
)

DIM = 6


def _logits(batch, n, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, n, generator=gen, dtype=torch.float64) * spread


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("spread", [0.5, 4.0, 12.0])
def test_sinkhorn_fused_matches_unrolled_autograd(n, iters, spread):
    z = _logits((3, 5), n, spread, seed=10 * n + iters).requires_grad_()
    upstream = torch.randn(3, 5, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = sinkhorn_knopp(z, iters)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), z)
    out = sinkhorn_knopp_fused(z, iters)
    (g_out,) = torch.autograd.grad((out * upstream).sum(), z)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-15)
    # the gradient is O(1); rebuilt iterates and the dropped max-shift term differ from autograd's by rounding only
    torch.testing.assert_close(g_out, g_ref, rtol=1e-11, atol=1e-12)
    if n == 1:
        assert torch.count_nonzero(g_out) == 0  # a 1x1 doubly stochastic matrix is constant


def test_sinkhorn_fused_unbatched_and_non_contiguous():
    z = _logits((4,), 3, 2.0, seed=3).transpose(-2, -1).requires_grad_()  # non-contiguous matrices
    for logits in (z, z[0]):
        ref, out = sinkhorn_knopp(logits, 7), sinkhorn_knopp_fused(logits, 7)
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-15)
        g_ref, g_out = (torch.autograd.grad(o.square().sum(), z)[0] for o in (ref, out))
        torch.testing.assert_close(g_out, g_ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_fused_gradcheck(iters):
    z = _logits((2,), 3, 3.0, seed=iters).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sinkhorn_knopp_fused(z, iters), (z,))


def test_sinkhorn_fused_rejects_zero_iterations():
    with pytest.raises(ValueError, match="iters"):
        sinkhorn_knopp_fused(torch.zeros(2, 2), 0)


def test_fused_functions_refuse_double_backward():
    """First-order only: a second derivative must raise, not come out silently wrong (the upstream gradient of a
    squared loss depends on the input, so without the guard autograd would differentiate the backward's ops)."""
    z = _logits((2,), 3, 1.0, seed=0).requires_grad_()
    (g,) = torch.autograd.grad(sinkhorn_knopp_fused(z, 3).square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()
    H = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_RMSProjection.apply(H, phi, 1e-6).square().sum(), H, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


def test_sinkhorn_function_keeps_only_output_and_sums():
    """Forward builds no graph: saved are M_T (n^2 per matrix) and 2 * iters normaliser vectors (n each)."""
    n, iters, batch = 4, 20, 37
    z = torch.randn(n, n, batch, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _SinkhornKnopp.apply(z, iters)
    assert sum(t.numel() for t in saved) == (n * n + 2 * iters * n) * batch


def _projection_ref(H, phi, eps):
    x = H.flatten(-2)
    rstd = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return ((x @ phi) * rstd).reshape(-1, phi.shape[-1]).t()


@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 3, 4, 5), (4, 1, 7)])
def test_rms_projection_matches_autograd_and_gradcheck(shape):
    gen = torch.Generator().manual_seed(len(shape))
    H = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    K = 2 * shape[-2] + shape[-2] ** 2
    phi = torch.randn(shape[-2] * shape[-1], K, generator=gen, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(K, H[..., 0, 0].numel(), generator=gen, dtype=torch.float64)
    ref = _projection_ref(H, phi, 1e-6)
    out = _RMSProjection.apply(H, phi, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad((ref * upstream).sum(), [H, phi])
    g_out = torch.autograd.grad((out * upstream).sum(), [H, phi])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    small = (H[:2].detach().clone().requires_grad_(), phi.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda H, phi: _RMSProjection.apply(H, phi, 1e-3), small)
    # one input frozen: the other's gradient is unchanged
    (g_phi,) = torch.autograd.grad((_RMSProjection.apply(H.detach(), phi, 1e-6) * upstream).sum(), phi)
    torch.testing.assert_close(g_phi, g_ref[1], rtol=1e-11, atol=1e-12)


def _pair(rate, seed, scale, **options):
    fast = build_connection("mhc", DIM, rate, layer_index=0, backend="torch", **options).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    plain = build_connection("mhc", DIM, rate, layer_index=0, backend="reference", **options).double()
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _coefficients(conn, H):
    """The coefficient path each backend runs: the token-last Functions, or the reference math."""
    return mhc_coefficients(conn, H) if conn.fused else conn.coefficients(H)


@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("iters", [1, 20])
def test_fused_coefficients_match_plain_at_large_spread(rate, iters):
    """Big projections and gates: H_res logits spread over tens of units, H_pre/H_post sigmoids near saturation."""
    fast, plain = _pair(rate, seed=rate + iters, scale=2.0, sinkhorn_iters=iters)
    H = torch.randn(3, 4, rate, DIM, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    u_mix = torch.randn(3, 4, rate, rate + 1, generator=gen, dtype=torch.float64)
    u_beta = torch.randn(3, 4, rate, generator=gen, dtype=torch.float64)
    results = []
    for conn in (fast, plain):
        mix, beta = _coefficients(conn, H)
        loss = (mix * u_mix).sum() + (beta * u_beta).sum()
        results.append((mix, beta, torch.autograd.grad(loss, [H, *conn.parameters()])))
    (mix_f, beta_f, g_f), (mix_p, beta_p, g_p) = results
    assert mix_f.shape == mix_p.shape and beta_f.shape == beta_p.shape
    assert mix_f.is_contiguous() and beta_f.is_contiguous()
    torch.testing.assert_close(mix_f, mix_p, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(beta_f, beta_p, rtol=1e-12, atol=1e-13)
    names = ["H"] + [name for name, _ in fast.named_parameters()]
    for name, a, b in zip(names, g_f, g_p):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")


def test_fused_parameter_names_and_shapes_unchanged():
    fast, plain = _pair(4, seed=0, scale=0.0)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32])
def test_fused_coefficients_under_bf16_autocast(h_dtype):
    """fp32 coefficients, finite gradients, and the same numbers as fp32 without autocast (also when backward runs
    inside the autocast region, where the Functions' matmuls must not drop to bf16)."""
    conn = build_connection("mhc", 32, 4, 0)
    with torch.no_grad():
        for p in conn.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    H = torch.randn(2, 9, 4, 32).to(h_dtype).requires_grad_()
    u_mix, u_beta = torch.randn(2, 9, 4, 5), torch.randn(2, 9, 4)
    params = list(conn.parameters())

    def run(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mix, beta = mhc_coefficients(conn, H if autocast else H.float())
            loss = (mix * u_mix).sum() + (beta * u_beta).sum()
            grads = torch.autograd.grad(loss, [H, *params])
        return mix, beta, grads

    mix, beta, grads = run(True)
    assert mix.dtype == torch.float32 and beta.dtype == torch.float32
    assert grads[0].dtype == h_dtype
    assert all(torch.isfinite(g).all() for g in grads)
    mix_r, beta_r, grads_r = run(False)
    torch.testing.assert_close(mix, mix_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(beta, beta_r, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Issue 13: finite for any finite input (fp32 logit spread beyond 170), exact gradients kept
# ---------------------------------------------------------------------------------------------------------------
def _wide_logits(spread: float, n: int = 4, batch: int = 6, seed: int = 0) -> torch.Tensor:
    """Logits whose spread exceeds ``spread``: one row (and one column) far below the rest in some matrices."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, n, n, generator=gen, dtype=torch.float64) * 3
    z[0, 1, :] -= spread  # a whole row underflows after exp(z - max) in fp32
    z[1, :, 2] -= spread  # a whole column
    z[2, 0, 0] += spread  # one huge entry
    return z


@pytest.mark.parametrize("which", ["reference", "fused"])
def test_sinkhorn_fp32_finite_at_spread_beyond_170(which):
    z64 = _wide_logits(200.0)
    assert (z64.amax(dim=(-2, -1)) - z64.amin(dim=(-2, -1))).max() > 170
    fn = sinkhorn_knopp if which == "reference" else sinkhorn_knopp_fused
    z = z64.float().requires_grad_()
    out = fn(z, 20)
    up = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g,) = torch.autograd.grad((out * up.float()).sum(), z)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    ref = sinkhorn_knopp(z64.requires_grad_(), 20)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), z64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)
    # the last step normalises the rows, also of the extreme matrices
    torch.testing.assert_close(out.sum(-1), torch.ones(6, 4), rtol=1e-5, atol=1e-5)


def test_old_linear_domain_would_fail_at_that_spread():
    """The defect this guards against: plain fp32 iterations on exp(logits - max) give NaN at spread > 170."""
    z = _wide_logits(200.0).float()
    m = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))
    for _ in range(20):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    assert not torch.isfinite(m).all()


@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_log_domain_gradcheck(iters):
    """float64 gradcheck of both paths of the fused Function (forced) and of the log-domain reference."""
    z = _logits((2,), 3, 3.0, seed=iters).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sinkhorn_knopp(z, iters), (z,))
    zt = z.detach().movedim((-2, -1), (0, 1)).contiguous().requires_grad_()
    for log_domain in (True, False):
        assert torch.autograd.gradcheck(lambda z: _SinkhornKnopp.apply(z, iters, log_domain), (zt,))


def test_sinkhorn_log_and_linear_paths_agree():
    z = _logits((5,), 4, 6.0, seed=2).movedim((-2, -1), (0, 1)).contiguous().requires_grad_()
    up = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = [_SinkhornKnopp.apply(z, 20, flag) for flag in (True, False)]
    grads = [torch.autograd.grad((o * up).sum(), z)[0] for o in outs]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
