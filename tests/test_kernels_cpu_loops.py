"""The opt-in compiled CPU loops (``HCV_CPU_KERNELS=build``, connections/kernels/cpu_loops.py).

The default CPU path must need no compiler: checked without building anything. The loops themselves are built once,
into a temporary cache directory, and compared with the ``bmm`` path they replace (float64 and float32) and, through a
connection, with the reference path. Skipped with a reason where no C++ compiler or ninja is installed.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from hcvision.connections import build_connection
from hcvision.connections.kernels import cpu_loops, torch_prims

DIM = 12


def test_default_cpu_path_builds_nothing(monkeypatch):
    monkeypatch.delenv("HCV_CPU_KERNELS", raising=False)
    cpu_loops.reset()

    def no_build(*args, **kwargs):
        raise AssertionError("the default CPU path must not compile anything")

    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", no_build)
    H, mix = torch.randn(2, 4, 8), torch.randn(4, 5)
    assert not cpu_loops.available(H, mix)
    conn = build_connection("dhc", DIM, 4, 0)
    out = conn(torch.randn(2, 3, 4, DIM, requires_grad=True), torch.tanh)
    out.sum().backward()
    cpu_loops.reset()


def test_cache_key_covers_source_flags_torch_and_cpu(monkeypatch):
    key = cpu_loops.cache_key()
    monkeypatch.setattr(cpu_loops, "_cpu_model", lambda: "another cpu")
    assert cpu_loops.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu_loops, "_FLAGS", ("-O2",))
    assert cpu_loops.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cpu_loops.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("HCV_CPU_KERNELS_DIR", "/some/dir")
    assert cpu_loops.cache_dir() == f"/some/dir/hcvision_cpu_loops_{key}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("ninja") is None or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler or ninja: the opt-in CPU loops cannot be built here (the default path needs none)")
    mp = pytest.MonkeyPatch()
    mp.setenv("HCV_CPU_KERNELS", "build")
    mp.setenv("HCV_CPU_KERNELS_DIR", str(tmp_path_factory.mktemp("cpu_loops")))
    cpu_loops.reset()
    ok = cpu_loops.available(torch.zeros(1, 2, 2), torch.zeros(2, 3))
    yield ok
    mp.undo()
    cpu_loops.reset()


@pytest.mark.slow
@pytest.mark.parametrize("per_token", [False, True], ids=["static", "per-token"])
@pytest.mark.parametrize("n,k", [(4, 1), (2, 1), (4, 4), (3, 3)])
def test_cpu_loops_match_bmm(built, per_token, n, k, monkeypatch):
    assert built, "the build failed although a compiler and ninja are installed"
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        gen = torch.Generator().manual_seed(n * 10 + k)
        H = torch.randn(3, 7, n, 20, generator=gen, dtype=dtype)
        mix = torch.randn(*((3, 7) if per_token else ()), n, k + n, generator=gen, dtype=dtype)
        g_in = torch.randn(3, 7, k, 20, generator=gen, dtype=dtype)
        g_res = torch.randn(3, 7, n, 20, generator=gen, dtype=dtype)
        into = torch.randn(3, 7, n, 20, generator=gen, dtype=dtype)
        y = torch.randn(3, 7, 1, 20, generator=gen, dtype=dtype)
        beta = torch.randn(*((3, 7) if per_token else ()), n, 1, generator=gen, dtype=dtype)

        def run():
            return (torch_prims.mix_product(H, mix),
                    *torch_prims.mix_product_backward(H, mix, g_in, g_res, True, True),
                    torch_prims.mix_product_backward(H, mix, g_in, g_res, True, False, grad_H=into.clone())[0],
                    *torch_prims.depth_backward(g_res, beta, y, True, True))

        assert cpu_loops.available(H, mix)
        fast = run()
        with monkeypatch.context() as m:
            m.setattr(cpu_loops, "available", lambda *a: False)
            ref = run()
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shc", "dhc", "sfc", "mhc"])
def test_connection_on_cpu_loops_matches_reference(built, kind):
    assert built
    rate = 4
    fast = build_connection(kind, DIM, rate, 1, backend="torch").double()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    plain = build_connection(kind, DIM, rate, 1, backend="reference").double()
    plain.load_state_dict(fast.state_dict())
    H = torch.randn(2, 5, fast.num_streams, fast.stream_dim, dtype=torch.float64, requires_grad=True)
    branch = lambda h: F.gelu(F.layer_norm(h, (h.shape[-1],)))  # noqa: E731
    outs = [c(H, branch) for c in (fast, plain)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-11, atol=1e-11)
    grads = [torch.autograd.grad(o.pow(2).sum(), [H, *c.parameters()]) for o, c in zip(outs, (fast, plain))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
