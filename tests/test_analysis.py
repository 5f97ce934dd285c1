"""hcvision.analysis: unfolded connection matrices (HC Eqs. 20, 27-29), layer similarity (Fig. 3), dynamic weights
(Fig. 12), plots and the CLI -- each checked against an independent computation."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import hcvision  # noqa: F401  (registers the ViT family)
import hcvision.models.dit  # noqa: F401  (registers the DiT family)
from hcvision.analysis import (
    connection_matrix,
    connection_weights,
    layer_similarity,
    plot_connection_matrix,
    plot_layer_similarity,
    plot_unfolded,
    plot_weight_distributions,
)
from hcvision.analysis.__main__ import analyse as cli_main
from hcvision.connections import Connection, HyperConnection, parallel_matrices, sequential_matrices

SUFFIXES = ["res", "shc2", "dhc2", "sfc2", "dfc2", "mhc2", "shc4", "dfc4", "mhc4"]
HC_RATE = {"res": 1, "shc2": 2, "dhc2": 2, "mhc2": 2, "shc4": 4, "mhc4": 4}  # kinds whose read-out sums n copies
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def vit(suffix: str, depth: int = 2, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(f"vit_digits_patch2_8_{suffix}", depth=depth, **kw).eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def prenorm_pattern(num_layers: int, readout: float) -> torch.Tensor:
    """Pre-Norm residual (HC Fig. 7, first panel): c_kj = 1 for 0 <= j < k <= L; the read-out row = ``readout``."""
    size = num_layers + 2
    expected = torch.tril(torch.ones(size, size), -1)
    expected[-1, :-1] = readout
    return expected


def perturb(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its init (connections far from Pre-Norm, adaLN gates non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = scale if "_conn." in name else 0.05
            p.add_(s * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------------------
# C^(0) and C^(i) at init: the Pre-Norm pattern
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_init_gives_prenorm_pattern(suffix):
    model = vit(suffix)
    r = connection_matrix(model, images())
    L = 4
    assert r.num_layers == L and r.layer_names[0] == "embed" and r.layer_names[-1] == "output"
    assert r.attention == [False, True, False, True, False, False]
    # HC kinds sum n identical streams at the read-out (the final LayerNorm removes the factor n); residual and FC
    # concatenate, so their read-out row is 1.
    readout = float(HC_RATE.get(suffix, 1))
    torch.testing.assert_close(r.C, prenorm_pattern(L, readout), atol=2e-6, rtol=0)
    # Every hyper hidden carries every earlier output with weight 1 (HC: B = 1, A_r = I; FC: own fraction;
    # mHC: doubly stochastic A_r keeps 1 B = 1).
    n = r.num_streams
    hyper = torch.tril(torch.ones(L + 2, L + 2), -1).expand(n, L + 2, L + 2)
    torch.testing.assert_close(r.hyper, hyper, atol=2e-6, rtol=0)
    if suffix.startswith(("sfc", "dfc")):  # FC blocks are exactly I_m: no fraction leaks into another slot
        m = r.num_inputs
        eye_blocks = torch.eye(m) * torch.tril(torch.ones(L + 2, L + 2), -1)[..., None, None]
        torch.testing.assert_close(r.blocks, eye_blocks, atol=2e-6, rtol=0)


def test_dynamic_per_token_at_init_is_the_static_pattern():
    r = connection_matrix(vit("dhc2"), images(2), per_token=True)
    assert r.per_token.shape == (2 * 17, 6, 6) and r.num_tokens == 34
    torch.testing.assert_close(r.per_token, prenorm_pattern(4, 2.0).expand(34, 6, 6), atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Sequential / parallel duality (HC Eqs. 17-19, 42, 53-55)
# ---------------------------------------------------------------------------------------------------------------
def load_matrices(model, mats):
    conns = [m for m in model.modules() if isinstance(m, HyperConnection)]
    assert len(conns) == len(mats)
    for conn, mat in zip(conns, mats):
        conn.set_matrix(mat)
    return model


@pytest.mark.parametrize("rate,depth", [(2, 2), (4, 2)])
def test_sequential_matrices_give_sequential_pattern(rate, depth):
    L = 2 * depth
    model = load_matrices(vit(f"shc{rate}", depth), sequential_matrices(rate, L))
    r = connection_matrix(model, images(1))
    # Eq. 42: every stream is the residual stream; the read-out sums n copies.
    assert torch.equal(r.C, prenorm_pattern(L, float(rate)))


def parallel_expected(rate: int, num_layers: int) -> torch.Tensor:
    """Eq. 53 by hand: groups of n layers read x_g (sum of streams), x_{g+1} = n x_g + sum of the group's outputs,
    x_0 = n h_0 (the embedding is replicated)."""
    group = lambda k: (k - 1) // rate  # noqa: E731  (1-based layer k)
    G = num_layers // rate
    C = torch.zeros(num_layers + 2, num_layers + 2)
    for k in range(1, num_layers + 2):
        g = group(k) if k <= num_layers else G
        C[k, 0] = rate ** (g + 1)
        for j in range(1, k):
            if group(j) < g:
                C[k, j] = rate ** (g - group(j) - 1)
    return C


@pytest.mark.parametrize("rate,depth", [(2, 2), (2, 3), (4, 4)])
def test_parallel_matrices_give_jagged_blocks(rate, depth):
    L = 2 * depth
    model = load_matrices(vit(f"shc{rate}", depth), parallel_matrices(rate, L))
    r = connection_matrix(model, images(1))
    expected = parallel_expected(rate, L)
    assert torch.equal(r.C, expected)
    if rate == 2 and depth == 2:  # spelled out: layers {1,2} and {3,4} run in parallel
        assert r.C.tolist() == [[0, 0, 0, 0, 0, 0],
                                [2, 0, 0, 0, 0, 0],
                                [2, 0, 0, 0, 0, 0],
                                [4, 1, 1, 0, 0, 0],
                                [4, 1, 1, 0, 0, 0],
                                [8, 2, 2, 1, 1, 0]]


# ---------------------------------------------------------------------------------------------------------------
# Unfolding = direct computation of the layer inputs from the layer outputs
# ---------------------------------------------------------------------------------------------------------------
def record_vit(model, x):
    """Embedding, every branch input/output (by wrapping the blocks' branch functions) and the read-out."""
    rec = {"in": [], "out": []}

    def wrap(fn):
        def inner(h, *args):
            y = fn(h, *args)
            rec["in"].append(h.detach().flatten(0, -2))
            rec["out"].append(y.detach().flatten(0, -2))
            return y
        return inner

    for blk in model.blocks:
        blk.attn_branch = wrap(blk.attn_branch)
        blk.mlp_branch = wrap(blk.mlp_branch)
    h1 = model.norm_pre.register_forward_hook(lambda m, a, out: rec.__setitem__("embed", out.detach().flatten(0, -2)))
    h2 = model.norm.register_forward_pre_hook(lambda m, a: rec.__setitem__("readout", a[0].detach().flatten(0, -2)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h1.remove(), h2.remove()
        for blk in model.blocks:
            del blk.attn_branch, blk.mlp_branch
    return rec


def check_unfolding(rec, blocks, num_inputs):
    """h_in^k[s] = sum_j sum_f c_kj[f, s] T^j[f] for k = 1..L+1 (T^0 = embedding, h_in^{L+1} = read-out)."""
    outs = [rec["embed"]] + rec["out"]
    ins = rec["in"] + [rec["readout"]]
    tokens, dim = outs[0].shape
    m = num_inputs
    if blocks.dim() == 4:  # static: same blocks for every token
        blocks = blocks.expand(tokens, *blocks.shape)
    for k in range(1, len(ins) + 1):
        pred = torch.zeros(tokens, m, dim // m, dtype=torch.float64)
        for j in range(k):
            frac = outs[j].double().unflatten(-1, (m, dim // m))
            pred += torch.einsum("tfs,tfc->tsc", blocks[:, k, j].double(), frac)
        target = ins[k - 1].double()
        err = (pred.flatten(-2) - target).abs().max() / target.abs().max()
        assert err < 1e-5, f"layer {k}: relative error {err:.2e}"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_unfolding_equals_direct_layer_inputs_vit(suffix):
    model = perturb(vit(suffix))
    x = images(2)
    rec = record_vit(model, x)
    dynamic = suffix[:3] in ("dhc", "dfc", "mhc")
    r = connection_matrix(model, x, per_token=dynamic)
    if not dynamic and suffix != "res":  # the connections really moved away from Pre-Norm
        assert r.C.shape == (6, 6) and not torch.allclose(r.C, prenorm_pattern(4, r.C[-1, 0].item()))
    check_unfolding(rec, r.per_token_blocks if dynamic else r.blocks, r.num_inputs)
    if dynamic:  # the per-token unfoldings really differ, and the reported C is their mean
        assert r.per_token.std(0).max() > 1e-3
        torch.testing.assert_close(r.C, r.per_token.mean(0), atol=1e-5, rtol=1e-5)


def test_unfolding_mean_is_not_the_unfolding_of_the_mean():
    """Dynamic kinds: averaging happens after the per-token unfolding (documented choice)."""
    from hcvision.analysis import unfold_matrices

    model = perturb(vit("dhc2"), scale=1.0)
    r = connection_matrix(model, images(2), per_token=True)
    of_mean, _ = unfold_matrices([m.unsqueeze(0) for m in r.layer_matrices], "dhc", 1)
    torch.testing.assert_close(r.blocks, r.per_token_blocks.mean(0))
    assert (of_mean[0, ..., 0, 0] - r.C).abs().max() > 1e-4


@pytest.mark.parametrize("suffix", ["shc2", "dfc2", "mhc2"])
def test_unfolding_equals_direct_layer_inputs_dit(suffix):
    torch.manual_seed(0)
    model = perturb(timm.create_model(f"dit_digits_2_{suffix}", depth=2).eval())
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([3, 500]), torch.tensor([1, 7])
    rec = {"in": [], "out": []}

    def wrap(fn):
        def inner(h, *args):
            out = fn(h, *args)
            rec["in"].append(h.detach().flatten(0, -2))
            rec["out"].append(out.detach().flatten(0, -2))
            return out
        return inner

    for blk in model.blocks:
        blk.attn_branch, blk.mlp_branch = wrap(blk.attn_branch), wrap(blk.mlp_branch)
    streams = model.forward_streams
    model.forward_streams = lambda h, c: (rec.__setitem__("embed", h.detach().flatten(0, -2)), streams(h, c))[1]
    hook = model.final_layer.register_forward_pre_hook(
        lambda m, a: rec.__setitem__("readout", a[0].detach().flatten(0, -2)))
    with torch.no_grad():
        model(x, t, y)
    hook.remove()
    for blk in model.blocks:
        del blk.attn_branch, blk.mlp_branch
    del model.forward_streams
    dynamic = suffix != "shc2"
    r = connection_matrix(model, x, forward=lambda m, inp: m(inp, t, y), per_token=dynamic)
    assert r.num_layers == 4 and r.attention[1] and not r.attention[2]
    check_unfolding(rec, r.per_token_blocks if dynamic else r.blocks, r.num_inputs)


def test_max_tokens_and_batches():
    model = perturb(vit("dhc2"))
    x = images(4)
    full = connection_matrix(model, x)
    chunked = connection_matrix(model, x, batch_size=3)
    assert full.num_tokens == chunked.num_tokens == 4 * 17
    torch.testing.assert_close(full.C, chunked.C, atol=1e-5, rtol=1e-5)
    sub = connection_matrix(model, x, max_tokens=10, batch_size=2, per_token=True)
    assert sub.num_tokens == 20 and sub.per_token.shape == (20, 6, 6)
    with pytest.raises(ValueError, match="max_tokens"):
        connection_matrix(model, x, max_tokens=0)
    with pytest.raises(ValueError, match="no hcvision Connection"):
        connection_matrix(torch.nn.Linear(2, 2), torch.zeros(1, 2))


def test_capture_leaves_no_trace():
    model = vit("dhc2")
    connection_matrix(model, images(1))
    for m in model.modules():
        if isinstance(m, Connection):
            assert "width" not in m.__dict__ and "depth" not in m.__dict__


# ---------------------------------------------------------------------------------------------------------------
# Layer similarity (Fig. 3)
# ---------------------------------------------------------------------------------------------------------------
def test_layer_similarity_matches_manual_residual_loop():
    model = perturb(vit("res", depth=3))
    x = images(3)
    with torch.no_grad():  # the Pre-Norm network written out by hand
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        inputs = []
        for blk in model.blocks:
            inputs.append(h)
            h = h + blk.attn_branch(h)
            inputs.append(h)
            h = h + blk.mlp_branch(h)
    cos = torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).flatten()
                       for a, b in zip(inputs[1:], inputs[:-1])])
    s = layer_similarity(model, x, batch_size=2, keep_tokens=True)
    assert s.layer_ids == [2, 3, 4, 5, 6] and s.attention == [False, True, False, True, False]
    torch.testing.assert_close(s.cosines, cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.median, cos.quantile(0.5, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.p05, cos.quantile(0.05, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.p95, cos.quantile(0.95, dim=1), atol=1e-5, rtol=1e-5)


def test_layer_similarity_hc_at_init_equals_its_residual_twin():
    res = perturb(vit("res"))
    hc = vit("shc2")
    hc.load_state_dict(res.state_dict(), strict=False)  # same body, connections at init (Eq. 14)
    a, b = layer_similarity(res, images(2)), layer_similarity(hc, images(2))
    torch.testing.assert_close(a.median, b.median, atol=1e-5, rtol=1e-5)
    assert a.median.min() < 0.999  # not trivially 1


# ---------------------------------------------------------------------------------------------------------------
# Dynamic weight distributions (Fig. 12)
# ---------------------------------------------------------------------------------------------------------------
def test_connection_weights_match_eqs_11_to_13():
    model = perturb(vit("dhc2"), scale=0.5)
    x, labels = images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    last = model.blocks[-1].mlp_conn
    seen = {}
    hook = last.register_forward_pre_hook(lambda m, a: seen.__setitem__("H", a[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    H = seen["H"]  # (B, N, n, C)
    with torch.no_grad():  # HC Eqs. 10-13 written out
        proj = torch.tanh(last.norm(H) @ last.dynamic_weight)
        alpha = last.static_alpha + last.dynamic_alpha_scale * proj[..., :-1]  # (B, N, n, 1+n): [A_m | A_r]
        beta = last.static_beta + last.dynamic_beta_scale * proj[..., -1]  # (B, N, n)
    d = connection_weights(model, x, labels, classes=[0, 2], reduce="tokens", batch_size=4)
    assert d.layer_name == "blocks.1.mlp_conn" and d.layer_index == 3
    assert d.entries == ["beta_1", "beta_2", "alpha_10", "alpha_11", "alpha_12", "alpha_20", "alpha_21", "alpha_22"]
    expected = torch.cat([beta, alpha.flatten(-2)], -1)  # (B, N, 8) in the same order
    torch.testing.assert_close(d.values[0], expected[labels == 0].flatten(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d.values[2], expected[labels == 2].flatten(0, 1), atol=1e-6, rtol=1e-5)
    assert set(d.values) == {0, 2}
    m = connection_weights(model, x, labels, reduce="mean")
    torch.testing.assert_close(m.values[1], expected[labels == 1].mean(1), atol=1e-6, rtol=1e-5)
    stats = m.summary()["stats"]["1"]["beta_1"]
    assert stats["mean"] == pytest.approx(expected[labels == 1].mean(1)[:, 0].mean().item(), abs=1e-6)


def test_connection_weights_bad_input():
    x, labels = images(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="static"):
        connection_weights(vit("shc2"), x, labels)
    with pytest.raises(ValueError, match="reduce"):
        connection_weights(vit("dhc2"), x, labels, reduce="median")
    with pytest.raises(ValueError, match=r"classes \[5\]"):
        connection_weights(vit("dhc2"), x, labels, classes=[5])


def test_fc_and_mhc_weight_names():
    x, labels = images(2), torch.tensor([0, 1])
    d = connection_weights(vit("dfc2"), x, labels)
    assert d.entries == ["beta_1", "beta_2", "gamma_11", "gamma_12", "alpha_11", "alpha_12",
                         "gamma_21", "gamma_22", "alpha_21", "alpha_22"]
    # at init: B = 1, Y = I, A = I (FC Eq. 15)
    torch.testing.assert_close(d.values[0][0], torch.tensor([1., 1., 1., 0., 1., 0., 0., 1., 0., 1.]))


# ---------------------------------------------------------------------------------------------------------------
# Plots and CLI
# ---------------------------------------------------------------------------------------------------------------
def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


def test_plots_write_pngs(tmp_path):
    model = perturb(vit("dhc2"))
    x = images(3)
    r = connection_matrix(model, x)
    s = layer_similarity(model, x)
    d = connection_weights(model, x, torch.tensor([0, 1, 1]))
    paths = [
        plot_connection_matrix(r, tmp_path / "c.png", title="C"),
        plot_connection_matrix(r.C, tmp_path / "sub" / "c_tensor.png"),
        plot_unfolded(r, tmp_path / "u.png"),
        plot_layer_similarity({"dhc": s, "again": s}, tmp_path / "s.png"),
        plot_weight_distributions(d, tmp_path / "w.png"),
    ]
    assert all(is_png(p) for p in paths)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.png", "c_tensor.png", "s.png", "sub", "u.png", "w.png"]
    with pytest.raises(ValueError, match="PNG"):
        plot_connection_matrix(r, tmp_path / "c.pdf")
    with pytest.raises(ValueError, match="square"):
        plot_connection_matrix(torch.zeros(3, 4), tmp_path / "bad.png")


@pytest.mark.slow
def test_cli_writes_pngs_and_json(tmp_path):
    name = "vit_digits_patch2_8_dhc2"
    torch.manual_seed(0)
    ckpt = tmp_path / "w.safetensors"
    out = tmp_path / "out"
    full = perturb(timm.create_model(name), scale=0.5)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(ckpt))
    report = cli_main(["--model", name, "--checkpoint", str(ckpt), "--num-images", "12", "--classes", "0,1",
                       "--batch-size", "5", "--out", str(out)])
    for f in ("connection_matrix.png", "unfolded.png", "layer_similarity.png", "weights.png"):
        assert is_png(out / f)
    data = json.loads((out / "analysis.json").read_text())
    assert data["files"] == report["files"] and data["num_images"] == 12
    assert data["connection_matrix"]["num_tokens"] == 12 * 17
    # the numbers are those of the checkpoint's weights on the same images, not of a fresh init
    from hcvision.analysis.__main__ import build_model, load_images

    model = build_model(name, str(ckpt)).eval()
    for k, v in full.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    x, labels, _ = load_images(model, "digits", 12, 0)
    expected = connection_matrix(model, x).C
    torch.testing.assert_close(torch.tensor(data["connection_matrix"]["C0"]), expected, atol=1e-5, rtol=1e-5)
    counts = {str(c): int((labels == c).sum()) * 17 for c in (0, 1)}  # every token of every sample
    assert data["weights"]["samples"] == counts and set(data["weights"]["stats"]) == {"0", "1"}
    assert data["layer_similarity"]["layer_ids"] == list(range(2, 13))


def test_cli_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not a registered timm model"):
        cli_main(["--model", "vit_digits_patch2_8_dhx2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        cli_main(["--model", "vit_digits_patch2_8_dhc2", "--checkpoint", str(tmp_path / "nope.safetensors"),
                  "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="neither 'digits' nor a folder"):
        cli_main(["--model", "vit_digits_patch2_8_res", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
