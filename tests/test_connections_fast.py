"""Every optimised (fused) connection path against the plain reference path: forward and gradients, float64.

The plain path (``backend="reference"``) is the one ``tests/test_connections.py`` checks against the papers' formulas,
so agreement here carries those checks over to the fast path. No timing here (benchmarks/ does that).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hcvision.connections import build_connection, expand_streams, kind_records, reduce_streams

DIM = 12
HC_KINDS = [r.name for r in kind_records() if r.family is not None]  # the kinds with a fast path


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _branch_params(seed: int, dim: int = DIM):
    gen = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(2 * dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)).requires_grad_()
    w2 = (torch.randn(dim, 2 * dim, generator=gen, dtype=torch.float64) / math.sqrt(2 * dim)).requires_grad_()
    return w1, w2


def _pair(kind: str, rate: int, seed: int, backend: str = "torch", **options):
    fast = build_connection(kind, DIM, rate, layer_index=seed, backend=backend, **options).double()
    _randomize(fast, seed)
    plain = build_connection(kind, DIM, rate, layer_index=seed, backend="reference", **options).double()
    plain.load_state_dict(fast.state_dict())
    assert fast.fused and not plain.fused
    return fast, plain


def _run(conn, H, w1, w2, upstream):
    """Forward through the connection around a Pre-Norm MLP branch; return output and all gradients."""
    params = list(conn.parameters())
    branch = lambda h: F.gelu(F.layer_norm(h, (h.shape[-1],)) @ w1.T) @ w2.T  # noqa: E731
    out = conn(H, branch)
    grads = torch.autograd.grad((out * upstream).sum(), [H, w1, w2, *params], allow_unused=True)
    return out, grads


def _compare(fast, plain, H, seed=0):
    w1, w2 = _branch_params(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    n, c = fast.num_streams, fast.stream_dim
    upstream = torch.randn(*H.shape[:-2], n, c, generator=gen, dtype=torch.float64)
    out_f, g_f = _run(fast, H, w1, w2, upstream)
    out_p, g_p = _run(plain, H, w1, w2, upstream)
    torch.testing.assert_close(out_f, out_p, rtol=1e-11, atol=1e-11)
    names = ["H", "w1", "w2"] + [name for name, _ in fast.named_parameters()]
    for name, a, b in zip(names, g_f, g_p):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")


CASES = [("shc", {}), ("sfc", {}), ("dhc", {}), ("dhc", {"tanh": False}), ("dhc", {"norm": "rmsnorm"}),
         ("dhc", {"norm": "none"}), ("dhc", {"norm_affine": False}), ("dfc", {}), ("dfc", {"tanh": False}),
         ("dfc", {"norm": "rmsnorm"}), ("mhc", {}), ("mhc", {"sinkhorn_iters": 3})]


@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}-{o}" for k, o in CASES])
@pytest.mark.parametrize("rate", [1, 2, 4])
def test_fused_matches_plain(kind, options, rate):
    if kind in ("sfc", "dfc") and rate == 1:
        rate = 3
    fast, plain = _pair(kind, rate, seed=rate, **options)
    H = torch.randn(2, 5, fast.num_streams, fast.stream_dim, dtype=torch.float64, requires_grad=True)
    _compare(fast, plain, H, seed=rate)


@pytest.mark.parametrize("kind", HC_KINDS)
def test_fused_matches_plain_on_expanded_and_strided_streams(kind):
    """The first layer sees expand_streams' view (stride 0 / fractions); later ones may see non-contiguous streams."""
    rate = 4
    fast, plain = _pair(kind, rate, seed=7)
    x = torch.randn(3, 4, DIM, dtype=torch.float64, requires_grad=True)
    _compare(fast, plain, expand_streams(x, kind, rate), seed=1)
    base = torch.randn(4, 3, fast.num_streams, fast.stream_dim, dtype=torch.float64)
    H = base.transpose(0, 1).requires_grad_()  # non-contiguous leading dims
    _compare(fast, plain, H, seed=2)


@pytest.mark.parametrize("kind", HC_KINDS)
def test_fused_split_width_depth_and_partial_gradients(kind):
    """width/depth called separately, with gradients flowing to only some inputs (frozen connection, frozen H)."""
    fast, plain = _pair(kind, 2, seed=3)
    for conn in (fast, plain):
        conn.requires_grad_(False)
    H = torch.randn(2, 3, fast.num_streams, fast.stream_dim, dtype=torch.float64, requires_grad=True)
    outs = []
    for conn in (fast, plain):
        h, ctx = conn.width(H)
        outs.append(conn.depth(torch.tanh(h) * 2.0, ctx))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-11, atol=1e-11)
    g0, g1 = (torch.autograd.grad(o.pow(2).sum(), H)[0] for o in outs)
    torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-11)
    # only parameters, streams frozen
    fast.requires_grad_(True)
    plain.requires_grad_(True)
    Hc = H.detach()
    grads = []
    for conn in (fast, plain):
        out = conn(Hc, lambda h: h.sin())
        grads.append(torch.autograd.grad(out.sum(), list(conn.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("kind", HC_KINDS)
def test_fused_stack_matches_plain_stack(kind):
    """A stack of sublayers: what the models run (streams from one fused depth step feed the next width step)."""
    rate, depth = 4, 4
    pairs = [_pair(kind, rate, seed=10 + k) for k in range(depth)]
    x = torch.randn(2, 3, DIM, dtype=torch.float64, requires_grad=True)
    results = []
    for which in (0, 1):
        H = expand_streams(x, kind, rate)
        for k, pair in enumerate(pairs):
            H = pair[which](H, lambda h, k=k: torch.tanh(h * (1.0 + 0.1 * k)))
        out = reduce_streams(H, kind)
        params = [p for pair in pairs for p in pair[which].parameters()]
        results.append((out, torch.autograd.grad(out.pow(2).sum(), [x, *params], allow_unused=True)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-11, atol=1e-11)
    for a, b in zip(results[0][1], results[1][1]):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_fused_is_default_and_option_is_accepted():
    assert build_connection("dhc", DIM, 2, 0).fused
    assert not build_connection("mhc", DIM, 2, 0, fused=False).fused
    with pytest.raises(ValueError, match="accepted by shc, dhc, sfc, dfc, mhc"):
        build_connection("residual", DIM, 1, 0, fused=False)  # the residual connection has no fast path


def test_fused_gradcheck_static_and_dynamic():
    for kind in ("shc", "dhc", "mhc"):
        conn = build_connection(kind, 4, 2, 1).double()
        _randomize(conn, 5, 0.3)
        H = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda H: conn(H, torch.sin), (H,))


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
def test_normed_linear_matches_norm_then_matmul(center):
    """normed_linear == F.layer_norm / F.rms_norm (no affine) followed by x @ W^T: values and both gradients."""
    from hcvision.connections.kernels.functions import normed_linear

    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 5, 4, 16, generator=gen, dtype=torch.float64) * 2 + 0.7).requires_grad_()
    W = torch.randn(6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 4, 6, generator=gen, dtype=torch.float64)
    ref_norm = F.layer_norm(x, (16,), eps=1e-6) if center else F.rms_norm(x, (16,), eps=1e-6)
    ref = ref_norm @ W.T
    out = normed_linear(x, W, center=center, eps=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad((ref * up).sum(), [x, W])
    g_out = torch.autograd.grad((out * up).sum(), [x, W])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(lambda a, b: normed_linear(a, b, center=center, eps=1e-3),
                             (x[:1, :2].detach().clone().requires_grad_(), W.detach().clone().requires_grad_()))


def test_normed_linear_float32_offset_streams():
    """fp32 statistics from E[x^2] - mu^2 stay accurate for streams whose mean is 4x their spread."""
    from hcvision.connections.kernels.functions import normed_linear

    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(64, 4, 384, generator=gen, dtype=torch.float64) + 4.0
    W64 = torch.randn(6, 384, generator=gen, dtype=torch.float64) / 20
    ref = F.layer_norm(x64, (384,), eps=1e-6) @ W64.T
    out = normed_linear(x64.float(), W64.float(), center=True, eps=1e-6).double()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("kind,options", [(k, o) for k, o in CASES if k in ("dhc", "dfc")],
                         ids=[f"{k}-{o}" for k, o in CASES if k in ("dhc", "dfc")])
def test_fused_width_coefficients_match_plain(kind, options):
    """The fused width's B (its per-token coefficient output) and all gradients through it equal the reference
    coefficients(H) (what analysis and matrix() read), for every norm."""
    fast, plain = _pair(kind, 4, seed=5, **options)
    H = torch.randn(2, 3, fast.num_streams, fast.stream_dim, dtype=torch.float64, requires_grad=True)
    beta_fast = fast.width(H)[1].beta
    beta_plain = plain.coefficients(H)[1]
    torch.testing.assert_close(beta_fast, beta_plain, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(beta_fast.square().sum(), [H, *fast.parameters()], allow_unused=True)
    g_plain = torch.autograd.grad(beta_plain.square().sum(), [H, *plain.parameters()], allow_unused=True)
    for a, b in zip(g_fast, g_plain):
        if a is None or b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
