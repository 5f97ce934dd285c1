"""``build_connection(..., recompute=True)``: same function and gradients, fewer bytes kept for backward.

The recompute scheme (HC arXiv 2409.19606 App. B; mHC arXiv 2512.24880 Sec. 4.3.2, Eq. 20) is in
``hcvision/connections/recompute.py``. Byte counts here are exact counts of the storages autograd keeps
(``saved_tensors_hooks``), never timings.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import hcvision.models.dit  # noqa: F401  (registers the names)
import hcvision.models.vit  # noqa: F401
from hcvision.connections import build_connection, connection_options, expand_streams, reduce_streams

KIND_RATES = [("residual", 1)] + [(k, n) for k in ("shc", "dhc", "sfc", "dfc", "mhc", "mhclite", "kromhc")
                                  for n in (1, 2, 4) if (k, n) != ("kromhc", 1)]
C, TOKENS, L = 8, (2, 3), 5


class Branch(nn.Module):
    """A Pre-Norm branch: its LayerNorm keeps the branch input for backward (what recompute must intercept)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, C)

    def forward(self, h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(torch.tanh(self.norm(h)))
        return y if scale is None else y * scale


def _stack(kind: str, rate: int, **options):
    torch.manual_seed(0)
    conns = nn.ModuleList(build_connection(kind, C, rate, k, **options) for k in range(L)).double()
    branches = nn.ModuleList(Branch() for _ in range(L)).double()
    with torch.no_grad():  # move off the init, so every coefficient (static and dynamic) matters
        for p in conns.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return conns, branches


def _run(kind, rate, conns, branches, x, scale=None):
    H = expand_streams(x, kind, rate)
    for conn, branch in zip(conns, branches):
        H = conn(H, branch, scale) if scale is not None else conn(H, branch)
    return reduce_streams(H, kind)


def _set(conns, recompute: bool, every: int) -> None:
    for c in conns:
        c.recompute, c.recompute_every = recompute, every


def _loss(out: torch.Tensor) -> torch.Tensor:
    w = torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()
    return (out * w).sum()


@pytest.mark.parametrize("kind,rate", KIND_RATES)
def test_same_outputs_and_gradients_float64(kind, rate):
    conns, branches = _stack(kind, rate)
    x = torch.randn(*TOKENS, C, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(*TOKENS, 1, dtype=torch.float64, requires_grad=True)  # an extra branch argument (DiT's gate)
    params = [x, scale, *conns.parameters(), *branches.parameters()]
    ref_out = _run(kind, rate, conns, branches, x, scale)
    ref = torch.autograd.grad(_loss(ref_out), params)
    for every in (1, 100):  # a segment per sublayer; one segment for the whole stack
        _set(conns, True, every)
        out = _run(kind, rate, conns, branches, x, scale)
        assert torch.equal(out, ref_out), (kind, rate, every)  # forward is the same code: bitwise equal
        got = torch.autograd.grad(_loss(out), params)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        _set(conns, False, 6)


def _saved(fn) -> dict[int, tuple[int, tuple]]:
    """Storages autograd keeps during ``fn()`` (forward only): ``{ptr: (bytes, shape of first saver)}``."""
    seen: dict[int, tuple[int, tuple]] = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


@pytest.mark.parametrize("kind,rate", [(k, n) for k, n in KIND_RATES if k != "residual" and n > 1])
def test_fewer_stream_sized_bytes(kind, rate):
    conns, branches = _stack(kind, rate)
    x = torch.randn(*TOKENS, C, dtype=torch.float64, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in [*conns.parameters(), *branches.parameters()]}
    tokens = math.prod(TOKENS)
    stream_bytes = tokens * C * (rate if kind in ("shc", "dhc", "mhc") else 1) * 8  # one H_l
    counts = {}
    for recompute in (False, True):
        _set(conns, recompute, 2)
        seen, out = _saved(lambda: _run(kind, rate, conns, branches, x))
        kept = {p: v for p, v in seen.items() if p not in skip}
        total = sum(b for b, _ in kept.values())
        streams = sum(b for b, _ in kept.values() if b >= stream_bytes and b > tokens * C * 8)  # bigger than a hidden
        counts[recompute] = (total, streams, len(kept))
        _loss(out).backward()
    total_off, streams_off, _ = counts[False]
    total_on, streams_on, _ = counts[True]
    assert total_on < total_off, counts
    if kind in ("shc", "dhc", "mhc"):
        # Without recompute every sublayer but the first keeps its n-stream input (sublayer 0's input is a view of x,
        # which the first branch keeps anyway); with L_r = 2 only sublayers 2 and 4 do.
        assert streams_off >= (L - 1) * stream_bytes, counts
        assert streams_on == 2 * stream_bytes, counts


def test_recompute_keeps_no_more_than_residual_plus_anchors():
    """Per sublayer, recompute keeps the branch output instead of the residual's stream: equal bytes but the anchors."""
    x = torch.randn(*TOKENS, C, dtype=torch.float64, requires_grad=True)
    totals = {}
    for kind, rate in (("residual", 1), ("shc", 4)):
        conns, branches = _stack(kind, rate, recompute=True, recompute_every=100)
        skip = {p.untyped_storage().data_ptr() for p in [*conns.parameters(), *branches.parameters()]}
        seen, out = _saved(lambda: _run(kind, rate, conns, branches, x))
        totals[kind] = sum(b for p, (b, _) in seen.items() if p not in skip)
    # One C-sized tensor per sublayer either way; shc keeps its first streams (a view of x) which residual keeps too.
    assert totals["shc"] <= totals["residual"] + math.prod(TOKENS) * C * 8, totals


def test_outer_hooks_still_see_branch_tensors():
    """Our hooks compose with an outer pair: the outer pack sees every tensor the branch keeps but the branch input."""
    conns, branches = _stack("dhc", 2, recompute=True)
    x = torch.randn(*TOKENS, C, dtype=torch.float64, requires_grad=True)
    unpacked = []

    def pack(t):
        return ("outer", t)

    def unpack(p):
        assert p[0] == "outer"
        unpacked.append(1)
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = _run("dhc", 2, conns, branches, x)
    _loss(out).backward()
    assert len(unpacked) > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_in_place_change_between_sublayers_falls_back_to_storing():
    conns, branches = _stack("shc", 2)
    x = torch.randn(*TOKENS, C, dtype=torch.float64, requires_grad=True)

    def run():
        H = expand_streams(x, "shc", 2)
        for i, (conn, branch) in enumerate(zip(conns, branches)):
            H = conn(H, branch)
            if i == 1:
                H.mul_(1.5)  # the recorded recipe no longer gives H: must be stored, not replayed
        return reduce_streams(H, "shc")

    ref = torch.autograd.grad(_loss(run()), [x, *conns.parameters()])
    _set(conns, True, 100)
    got = torch.autograd.grad(_loss(run()), [x, *conns.parameters()])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_options_and_errors():
    for kind in ("residual", "shc", "dhc", "sfc", "dfc", "mhc"):
        assert "recompute" in connection_options(kind)
        conn = build_connection(kind, C, 1, 0, recompute=True, recompute_every=3)
        assert conn.recompute or kind == "residual"
    with pytest.raises(ValueError, match="recompute must be"):
        build_connection("shc", C, 2, 0, recompute="yes")
    with pytest.raises(ValueError, match="recompute_every"):
        build_connection("shc", C, 2, 0, recompute=True, recompute_every=0)
    conns, branches = _stack("mhc", 2, recompute=True)
    with torch.no_grad():  # no graph: the plain path
        out = _run("mhc", 2, conns, branches, torch.randn(*TOKENS, C, dtype=torch.float64))
    assert out.shape == (*TOKENS, C)


@pytest.mark.parametrize("name", ["vit_digits_patch2_8_dhc2", "dit_digits_2_mhc2"])
def test_models_take_recompute_through_connection_options(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, depth=2).double()
    torch.manual_seed(0)
    rc = timm.create_model(name, depth=2, connection_options=dict(recompute=True, recompute_every=3)).double()
    rc.load_state_dict(ref.state_dict())
    assert all(m.recompute for m in rc.modules() if hasattr(m, "recompute_every") and m.kind != "residual")
    g = torch.Generator().manual_seed(1)
    if name.startswith("vit"):
        inputs = (torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64),)
    else:
        inputs = (torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3, 7]), torch.tensor([1, 2]))
    grads = []
    for model in (ref, rc):
        model.train()
        out = model(*inputs)
        grads.append(torch.autograd.grad(_loss(out), list(model.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
