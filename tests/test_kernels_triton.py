"""The Triton backend against the reference path, on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Every kind at n = 1, 2, 4 (static coefficients for shc/sfc, per-token ones for dhc/dfc/mhc), with and without
recompute: outputs and all gradients (streams, branch weights, every connection parameter) in float32 on small shapes.
Also the kernels one by one against torch, padding (n = 3), the norms of the dynamic kinds, bf16 inputs, and mHC at
a logit spread where a linear-domain Sinkhorn would give NaN. Tests that need CUDA are skipped without it.

Triton reads ``TRITON_INTERPRET`` when its own language functions and our kernels are defined, so the variable is set
here before triton is imported. If another test module of the same pytest process imported triton first (torch's
inductor may), this file is run again in a fresh subprocess instead, and the in-process copies skip.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PRELOADED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its language functions read it at definition

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="the triton package is not installed")

from hcvision.connections import build_connection, expand_streams, reduce_streams  # noqa: E402

DIM = 8


def test_in_a_fresh_process_when_triton_was_imported_earlier():
    """The whole file in a subprocess with the interpreter on, when this process imported triton without it."""
    if not _PRELOADED:
        pytest.skip("triton was first imported here with the interpreter on: the tests below run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Kernels defined under the interpreter in this process (or a skip when the subprocess runs them)."""
    if _PRELOADED:
        yield
        _restore()
        return
    name = "hcvision.connections.kernels.triton_kernels"
    if name in sys.modules:  # defined by an earlier import in this process: define them again, interpreted
        importlib.reload(sys.modules[name])
    yield
    _restore()


def _restore() -> None:
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def _skip_when_preloaded(request):
    if _PRELOADED and request.node.name != "test_in_a_fresh_process_when_triton_was_imported_earlier":
        pytest.skip("triton was imported earlier in this process without the interpreter: run in a subprocess above")


def _pair(kind: str, rate: int, seed: int, **options):
    fast = build_connection(kind, DIM, rate, layer_index=seed, backend="triton", **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    plain = build_connection(kind, DIM, rate, layer_index=seed, backend="reference", **options)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _stack(conns, x, kind, rate, w):
    """Two sublayers around a Pre-Norm branch, from expand_streams (a stride-0 view for HC kinds) to reduce_streams."""
    H = expand_streams(x, kind, rate)
    for conn in conns:
        H = conn(H, lambda h: F.gelu(F.layer_norm(h, (h.shape[-1],))) @ w)
    return reduce_streams(H, kind)


EPS32 = torch.finfo(torch.float32).eps


def _fp32_error_bound(ref32: torch.Tensor, exact: torch.Tensor, scale: float) -> float:
    """How far a float32 evaluation of this computation may lie from its float64 value on any CPU: a few times the
    error of the reference path's own float32 evaluation (same arithmetic in another order, another kernel library),
    and at least 64 ulps of ``scale``: the larger of the tensor's and the output's largest value (a gradient summed over
    tokens can cancel to ~0 and still carry the rounding of its terms, which are of the output's order). Measured here
    on the 2-core box: the interpreted kernels' error stays below 0.3 of this bound in every case."""
    return 4 * float((ref32.double() - exact).abs().max()) + 64 * EPS32 * scale


def _compare(kind: str, rate: int, seed: int = 0, **options):
    """Triton (float32, interpreted) against the reference path, both measured against the reference in float64:
    a fixed float32 tolerance tuned on one CPU fails on another (MKL and numpy pick other kernels), this bound does
    not, and a wrong index or mask is off by O(1), far outside it."""
    pairs = [_pair(kind, rate, seed + i, **options) for i in range(2)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, DIM, generator=gen)
    w = torch.randn(DIM, DIM, generator=gen) / math.sqrt(DIM)
    up = torch.randn(2, 3, DIM, generator=gen)
    results = []
    for which, dtype in ((0, torch.float32), (1, torch.float32), (1, torch.float64)):
        conns = [pair[which] if dtype == torch.float32 else copy.deepcopy(pair[which]).to(dtype) for pair in pairs]
        xd, wd = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        out = _stack(conns, xd, kind, rate, wd)
        params = [p for c in conns for p in c.parameters()]
        results.append((out, torch.autograd.grad((out * up.to(dtype)).sum(), [xd, wd, *params], allow_unused=True)))
    (out_t, g_t), (out_r, g_r), (out_x, g_x) = results
    names = ["out", "grad x", "grad w"] + [f"grad {i}.{n}" for i, pair in enumerate(pairs)
                                           for n, _ in pair[0].named_parameters()]
    out_scale = float(out_x.abs().max())
    for name, a, b, exact in zip(names, (out_t, *g_t), (out_r, *g_r), (out_x, *g_x)):
        assert (a is None) == (b is None) == (exact is None), name
        if a is None:
            continue
        assert a.dtype == torch.float32 and exact.dtype == torch.float64, name
        scale = max(out_scale, float(exact.abs().max()))
        err, bound = float((a.double() - exact).abs().max()), _fp32_error_bound(b, exact, scale)
        assert err <= bound, f"{name}: triton differs from the float64 reference by {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("recompute", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "recompute"])
@pytest.mark.parametrize("rate", [1, 2, 4])
@pytest.mark.parametrize("kind", ["shc", "sfc", "dhc", "dfc", "mhc"])
def test_triton_matches_reference(kind, rate, recompute):
    # recompute_every=2: the second sublayer's streams are replayed from the first's stored input in backward
    options = dict(recompute=True, recompute_every=2) if recompute else {}
    if kind == "mhc":  # the interpreter runs each Sinkhorn iteration op by op: 20 are tested below, 4 suffice here
        options["sinkhorn_iters"] = 4
    _compare(kind, rate, seed=rate, **options)


@pytest.mark.parametrize("kind,options", [("dhc", {"norm": "rmsnorm"}), ("dhc", {"norm": "none"}),
                                          ("dhc", {"tanh": False}), ("dfc", {"norm_affine": False}),
                                          ("mhc", {"sinkhorn_iters": 3})], ids=str)
def test_triton_dynamic_options(kind, options):
    _compare(kind, 2, seed=3, **options)


@pytest.mark.parametrize("kind", ["shc", "dhc", "mhc"])
def test_triton_padding_three_streams(kind):
    """n = 3 pads the small dims to 4: the masks must keep the padding out of every sum."""
    _compare(kind, 3, seed=4, **({"sinkhorn_iters": 4} if kind == "mhc" else {}))


def test_triton_mhc_finite_at_large_logit_spread():
    """Sinkhorn in the log domain: logits spread far beyond 170 stay finite and match the float64 reference."""
    fast, plain = _pair("mhc", 4, seed=1)
    with torch.no_grad():
        fast.gate_res.fill_(400.0)
        fast.phi.normal_(0.0, 1.0)
    plain = build_connection("mhc", DIM, 4, layer_index=1, backend="reference").double()
    plain.load_state_dict(fast.state_dict())
    H = torch.randn(2, 3, 4, DIM)
    from hcvision.connections.kernels import triton_ops

    Hg = H.clone().requires_grad_()
    mix_t, post_t = triton_ops.mhc_coefficients(fast, Hg)
    H64 = H.double().requires_grad_()
    mix_r, post_r = plain.coefficients(H64)
    logits = plain.gate_res.item() * 1.0
    assert logits > 170
    assert torch.isfinite(mix_t).all()
    torch.testing.assert_close(mix_t.double(), mix_r, rtol=1e-4, atol=1e-5)
    u = torch.randn(mix_t.shape, generator=torch.Generator().manual_seed(2))
    (g_t,) = torch.autograd.grad((mix_t * u).sum(), Hg)
    (g_r,) = torch.autograd.grad((mix_r * u.double()).sum(), H64)
    assert torch.isfinite(g_t).all()
    torch.testing.assert_close(g_t.double(), g_r, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["shc", "dfc", "mhc"])
def test_triton_bf16_streams_under_autocast(kind):
    """bf16 inputs: the kernels load bf16, accumulate in fp32; agreement with the fp32 reference at bf16 precision."""
    fast, plain = _pair(kind, 2, seed=5)
    H = torch.randn(2, 3, fast.num_streams, fast.stream_dim)
    branch = torch.nn.Linear(DIM, DIM)
    out_t = fast(H.bfloat16(), lambda h: branch(h.float()).bfloat16())
    out_r = plain(H, branch)
    assert out_t.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out_t.float(), out_r, rtol=3e-2, atol=3e-2)
    out_t.float().sum().backward()


@pytest.mark.parametrize("n,k,per_token", [(4, 1, True), (2, 1, False), (4, 4, True), (3, 3, False)])
def test_triton_primitives_match_torch(n, k, per_token):
    from hcvision.connections.kernels import torch_prims, triton_ops

    gen = torch.Generator().manual_seed(n + k)
    c = 10  # not a power of two: the channel mask
    H = torch.randn(2, 3, n, c, generator=gen)
    mix = torch.randn(*((2, 3) if per_token else ()), n, k + n, generator=gen)
    g_in, g_res = torch.randn(2, 3, k, c, generator=gen), torch.randn(2, 3, n, c, generator=gen)
    into = torch.randn(2, 3, n, c, generator=gen)
    beta = torch.randn(*((2, 3) if per_token else ()), n, 1, generator=gen)
    y = torch.randn(2, 3, 1 if k == 1 else n, c, generator=gen)
    x = torch.randn(7, c, generator=gen) * 2 + 1
    W = torch.randn(5, c, generator=gen)
    gp = torch.randn(7, 5, generator=gen)
    into_x = torch.randn(7, c, generator=gen)

    def run(P, dtype=torch.float32):
        H_, mix_, g_in_, g_res_, into_, beta_, y_, x_, W_, gp_, into_x_ = (
            t.to(dtype) for t in (H, mix, g_in, g_res, into, beta, y, x, W, gp, into_x))
        out = [P.mix(H_, mix_), *P.mix_backward(H_, mix_, g_in_, g_res_, True, True),
               P.mix_backward(H_, mix_, g_in_, g_res_, True, False, grad_H=into_.clone())[0],
               P.depth_forward(g_res_, beta_, y_), *P.depth_backward(g_res_, beta_, y_, True, True)]
        for center, eps in ((True, 1e-6), (False, 1e-6), (False, None)):
            proj, saved = P.normed_linear_forward(x_, W_, center, eps)
            out += [proj, *P.normed_linear_backward(saved, gp_, True, True),
                    P.normed_linear_backward(saved, gp_, True, False, grad_x_into=into_x_.clone())[0]]
        return out

    # against torch in float64, with the bound of _compare (a fixed float32 tolerance depends on the CPU)
    for i, (a, b, exact) in enumerate(zip(run(triton_ops.TRITON), run(torch_prims.TORCH),
                                          run(torch_prims.TORCH, torch.float64))):
        err = float((a.double() - exact).abs().max())
        bound = _fp32_error_bound(b, exact, float(exact.abs().max()))
        assert err <= bound, f"output {i}: triton differs from the float64 reference by {err:.3g} > {bound:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above cover CPU)")
@pytest.mark.parametrize("kind", ["shc", "dhc", "sfc", "dfc", "mhc"])
def test_triton_on_cuda_matches_reference(kind):
    fast = build_connection(kind, 64, 4, 1, backend="triton").cuda()
    plain = build_connection(kind, 64, 4, 1, backend="reference").cuda()
    plain.load_state_dict(fast.state_dict())
    H = torch.randn(4, 17, fast.num_streams, fast.stream_dim, device="cuda", requires_grad=True)
    outs = [c(H, torch.tanh) for c in (fast, plain)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    g = [torch.autograd.grad(o.square().sum(), [H, *c.parameters()]) for o, c in zip(outs, (fast, plain))]
    for a, b in zip(*g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
