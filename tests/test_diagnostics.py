"""hcvision.analysis.diagnostics against direct computations on small models."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import timm
import torch

import hcvision  # noqa: F401  (registers the models)
from hcvision.analysis.diagnostics import composite_gain, connection_diagnostics, stream_similarity
from hcvision.connections import Connection


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(f"vit_digits_patch2_8_{kind}", num_classes=10)


def _conns(model) -> list:
    return sorted((m for m in model.modules() if isinstance(m, Connection)), key=lambda c: c.layer_index)


def _reference(model) -> dict:
    """Per layer with numpy, from each connection's own static_coefficients() (per-layer Sinkhorn for mHC)."""
    conns = _conns(model)
    mats, betas = [], []
    for c in conns:
        mix, beta = c.static_coefficients()
        mats.append(mix.detach().double().numpy())
        betas.append(beta.detach().double().numpy())
    k = conns[0].num_inputs
    n = conns[0].num_streams
    a_r = [m[:, k:] for m in mats]
    dist = [np.sqrt(((a - np.eye(n)) ** 2).sum()) for a in a_r]
    gains_f, gains_b = [], []
    L = len(a_r)
    for layer in range(L):  # P_l = A_r^{L T} ... A_r^{l T}: streams carried from sublayer l to the end
        P = np.eye(n)
        for t in range(layer, L):
            P = a_r[t].T @ P
        gains_f.append(np.abs(P).sum(1).max())
        gains_b.append(np.abs(P).sum(0).max())
    allb = np.concatenate(betas)
    return {"conn/res_dist_mean": np.mean(dist), "conn/res_dist_max": np.max(dist), "conn/beta_mean": allb.mean(),
            "conn/beta_std": allb.std(), "conn/beta_range_max": max(b.max() - b.min() for b in betas),
            "conn/composite_gain_fwd": max(gains_f), "conn/composite_gain_bwd": max(gains_b)}


def test_residual_model_has_no_diagnostics():
    m = _model("res")
    assert connection_diagnostics(m) == {}
    assert stream_similarity(m, torch.randn(2, 1, 8, 8)) == {}


@pytest.mark.parametrize("kind", ["shc2", "dhc2", "sfc2", "dfc4", "shc4"])
def test_hc_fc_start_at_the_identity(kind):
    d = connection_diagnostics(_model(kind))
    for key in ("conn/res_dist_mean", "conn/res_dist_max", "conn/width_dist_max", "conn/beta_std",
                "conn/beta_range_max"):
        assert d[key] == 0.0, key
    assert d["conn/beta_mean"] == 1.0
    assert d["conn/composite_gain_fwd"] == d["conn/composite_gain_bwd"] == 1.0
    assert ("conn/dynamic_scale_mean" in d) == kind.startswith("d")


def test_mhc_init_by_hand():
    """Bias diag logit chosen so that H_res = [[0.95, 0.05], [0.05, 0.95]] (n = 2): ||A_r - I||_F = sqrt(4 * 0.05^2)."""
    d = connection_diagnostics(_model("mhc2"))
    assert d["conn/res_dist_mean"] == pytest.approx(0.1, abs=1e-5)
    assert d["conn/composite_gain_fwd"] == pytest.approx(1.0, abs=1e-5)  # doubly stochastic: gain 1
    assert d["conn/dynamic_scale_mean"] == pytest.approx(0.01)
    assert "conn/width_dist_mean" not in d


@pytest.mark.parametrize("kind", ["shc2", "dhc4", "sfc2", "mhc2", "mhc4"])
def test_perturbed_models_match_direct_computation(kind):
    m = _model(kind)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in _conns(m):  # move every static matrix away from its init
            for p in c.static_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    d = connection_diagnostics(m)
    ref = _reference(m)
    for key, value in ref.items():
        assert d[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert ref["conn/res_dist_max"] > 0.1
    if not kind.startswith("mhc"):  # width matrix vs its init, by hand from the perturbation
        conns = _conns(m)
        from hcvision.connections import hc_init_matrix

        w = [torch.linalg.matrix_norm(c.static_alpha.detach() - hc_init_matrix(c.kind, c.num_streams, c.layer_index)[0])
             for c in conns]
        assert d["conn/width_dist_max"] == pytest.approx(max(w).item(), rel=1e-5)
    else:  # mHC stays doubly stochastic: gain 1 up to Sinkhorn's residual
        assert d["conn/composite_gain_fwd"] == pytest.approx(1.0, abs=1e-3)


def test_composite_gain_rows_vs_columns():
    one = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # row sums 3, 0; column sums 1, 2
    assert composite_gain(one) == (3.0, 2.0)
    grow = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).expand(3, 2, 2)  # P_0 = M^3: gain 8
    assert composite_gain(grow) == (8.0, 8.0)
    # order matters: M_1 M_0 with the map applied first listed first
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    f, bw = composite_gain(torch.stack([a, b]))
    assert (f, bw) == (3.0, 3.0)  # b @ a = [[0, 3], [1, 0]]: rows 3, 1; columns 1, 3 (max 3 either way)
    f2, b2 = composite_gain(torch.stack([torch.tensor([[1.0, 1.0], [0.0, 1.0]]), b]))
    P = np.array([[3.0, 0.0], [0.0, 1.0]]) @ np.array([[1.0, 1.0], [0.0, 1.0]])
    assert (f2, b2) == (max(np.abs(P).sum(1).max(), 3.0), max(np.abs(P).sum(0).max(), 3.0))


def _hook_cosines(model, x) -> list:
    """Independent path: forward pre-hooks (the ViT calls its connections as modules) + pairwise cosine_similarity."""
    seen = []
    hooks = [c.register_forward_pre_hook(lambda mod, args: seen.append((mod.layer_index, args[0].detach())))
             for c in _conns(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for _, H in sorted(seen, key=lambda s: s[0]):
        n = H.shape[-2]
        pairs = [torch.nn.functional.cosine_similarity(H[..., i, :], H[..., j, :], dim=-1).mean()
                 for i, j in itertools.permutations(range(n), 2)]
        out.append(torch.stack(pairs).mean().item())
    return out


@pytest.mark.parametrize("kind", ["shc2", "dhc4", "mhc2"])
def test_stream_similarity_against_hooks(kind):
    m = _model(kind)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    init = stream_similarity(m, x)
    assert init["conn/stream_cos_min"] == pytest.approx(1.0, abs=1e-5)  # n identical copies at init
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for c in _conns(m):
            for p in c.static_parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    m.train()
    s = stream_similarity(m, x)
    assert m.training  # mode restored
    ref = _hook_cosines(m, x)
    assert s["conn/stream_cos_mean"] == pytest.approx(np.mean(ref), abs=1e-5)
    assert s["conn/stream_cos_max"] == pytest.approx(max(ref), abs=1e-5)
    assert s["conn/stream_cos_last"] == pytest.approx(ref[-1], abs=1e-5)
    assert s["conn/stream_cos_min"] < 0.999  # the perturbation separated the streams
    assert not any("width" in c.__dict__ for c in _conns(m))  # wrappers removed


def test_stream_similarity_fc_and_dit():
    assert stream_similarity(_model("sfc2"), torch.randn(2, 1, 8, 8)) == {}  # fractions are not copies
    torch.manual_seed(0)
    dit = timm.create_model("dit_digits_2_shc2")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    s = stream_similarity(dit, x, forward=lambda mod, inp: mod(inp, t, y))  # DiT calls width() directly
    assert s["conn/stream_cos_min"] == pytest.approx(1.0, abs=1e-5)
    assert connection_diagnostics(dit)["conn/beta_mean"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Gain monitors: distance from doubly stochastic, logit spread (no forward pass)
# ---------------------------------------------------------------------------------------------------------------
def test_doubly_stochastic_error_by_hand():
    from hcvision.analysis.diagnostics import doubly_stochastic_error

    ds = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    rows_only = torch.tensor([[0.5, 0.5], [0.9, 0.1]])  # rows 1, columns 1.4 / 0.6
    negative = torch.tensor([[1.2, -0.2], [-0.2, 1.2]])  # sums 1, an entry -0.2
    err = doubly_stochastic_error(torch.stack([ds, rows_only, negative]))
    torch.testing.assert_close(err, torch.tensor([0.0, 0.4, 0.2]), rtol=0, atol=1e-6)


def test_monitors_at_init_by_hand():
    """Spreads from the inits: mHC log(d (n-1) / (1-d)); mHC-lite the identity's lead log(a_id / u); KromHC 8."""
    n, d = 4, 0.95
    u = (1 - d) / (math.factorial(n) - math.factorial(n - 1))
    expected = {"mhc4": math.log(d * (n - 1) / (1 - d)), "mhclite4": math.log((1 - 23 * u) / u), "kromhc4": 8.0}
    for kind, spread in expected.items():
        diag = connection_diagnostics(_model(kind))
        assert diag["conn/res_logit_spread_max"] == pytest.approx(spread, rel=1e-5), kind
        assert diag["conn/res_logit_spread_mean"] == pytest.approx(spread, rel=1e-5), kind
        assert diag["conn/res_ds_err_max"] <= 1e-6, kind  # every init here is doubly stochastic
        assert diag["conn/composite_gain_fwd"] == pytest.approx(1.0, abs=1e-5), kind
    hc = connection_diagnostics(_model("dhc2"))
    assert hc["conn/res_ds_err_max"] == 0.0 and "conn/res_logit_spread_max" not in hc


@pytest.mark.parametrize("kind", ["mhc4", "mhclite4", "kromhc4", "kromhc2", "shc2"])
def test_monitors_of_perturbed_models_match_direct_computation(kind):
    m = _model(kind)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for c in _conns(m):
            for p in c.static_parameters():
                p.add_(3.0 * torch.randn(p.shape, generator=g))
    d = connection_diagnostics(m)
    errs, spreads = [], []
    for c in _conns(m):  # per layer, with numpy, from each connection's own coefficients and biases
        mix, _ = c.static_coefficients()
        h = mix.detach().double().numpy()[:, c.num_inputs:].T
        errs.append(max(np.abs(h.sum(1) - 1).max(), np.abs(h.sum(0) - 1).max(), max(0.0, -h.min())))
        if hasattr(c, "bias_res"):
            b = c.bias_res.detach().double().numpy()
            groups = b.reshape(-1, 2) if c.kind == "kromhc" else b.reshape(1, -1)
            spreads.append((groups.max(1) - groups.min(1)).max())
    assert d["conn/res_ds_err_max"] == pytest.approx(max(errs), rel=1e-4, abs=1e-7)
    assert d["conn/res_ds_err_mean"] == pytest.approx(np.mean(errs), rel=1e-4, abs=1e-7)
    if spreads:
        assert d["conn/res_logit_spread_max"] == pytest.approx(max(spreads), rel=1e-5)
        assert d["conn/res_logit_spread_mean"] == pytest.approx(np.mean(spreads), rel=1e-5)
    if kind.startswith(("mhclite", "kromhc")):  # exact by construction, also far from init
        assert d["conn/res_ds_err_max"] <= 1e-6
        assert d["conn/composite_gain_fwd"] == pytest.approx(1.0, abs=1e-5)
        assert d["conn/composite_gain_bwd"] == pytest.approx(1.0, abs=1e-5)
    elif kind.startswith("mhc"):  # Sinkhorn's residue at this logit scale
        assert d["conn/res_ds_err_max"] > 1e-4
    else:  # HC's A_r is unconstrained
        assert d["conn/res_ds_err_max"] > 0.5
