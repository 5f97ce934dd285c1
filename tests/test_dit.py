"""HC-DiT zoo: registration and cfgs, DiT against an independent reference, checkpoint conversion (official and
diffusers) with identical outputs for every connection kind, parameter counts (DiT Table 1, HC App. B), bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

import hcvision  # noqa: F401
import hcvision.models.dit as dit  # registers the DiT family even before hcvision.models imports it
from hcvision.connections import Connection, extra_parameters

SUFFIXES = ["res", "shc2", "shc4", "dhc2", "dhc4", "sfc2", "sfc4", "dfc2", "dfc4", "mhc2", "mhc4",
            "mhclite2", "mhclite4", "kromhc2", "kromhc4"]
KIND_OF = {s: (("residual", 1) if s == "res" else (s[:-1], int(s[-1]))) for s in SUFFIXES}
# test-size DiT: 32-d, 2 blocks, 2 heads, 8x8x4 input, patch 2, 10 classes (matches the diffusers stand-in below)
TINY = dict(embed_dim=32, depth=2, num_heads=2, input_size=8, num_classes=10)


# ---------------------------------------------------------------------------------------------------------------
# An independent reference DiT (Peebles & Xie 2023), written from the paper, in float64, on official names.
# ---------------------------------------------------------------------------------------------------------------
def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, cols), one(dim // 2, rows)], axis=1)  # first half: x (column)


def reference_dit(sd, x, t, y, *, patch, heads, freq_shift=0.0, mlp_eps=1e-6):
    """DiT forward from its equations; ``freq_shift``/``mlp_eps`` reproduce diffusers' variant when asked."""
    g = {k: v.double() for k, v in sd.items()}
    x, t = x.double(), t.double()
    lin = lambda h, name: h @ g[name + ".weight"].T + g[name + ".bias"]  # noqa: E731
    ln = lambda h, eps: (h - h.mean(-1, True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)  # noqa: E731
    gelu = lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # noqa: E731
    silu = lambda h: h * torch.sigmoid(h)  # noqa: E731
    B, cin, height, width = x.shape
    gh, gw, dim = height // patch, width // patch, g["x_embedder.proj.weight"].shape[0]
    patches = x.reshape(B, cin, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)
    tok = patches @ g["x_embedder.proj.weight"].reshape(dim, -1).T + g["x_embedder.proj.bias"]
    tok = tok + torch.from_numpy(ref_pos_embed(dim, gh))
    half = 128  # DiT computes the phases t * w_i in float32 (at t ~ 1e3 that is the precision that defines it)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))
    args = (t.float()[:, None] * freqs[None]).double()
    temb = lin(silu(lin(torch.cat([torch.cos(args), torch.sin(args)], 1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + g["y_embedder.embedding_table.weight"][y]
    hd = dim // heads
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in g:
        b = f"blocks.{i}."
        s1, sc1, g1, s2, sc2, g2 = lin(silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        h = ln(tok, 1e-6) * (1 + sc1[:, None]) + s1[:, None]
        q, k, v = lin(h, b + "attn.qkv").reshape(B, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, -1, dim)
        tok = tok + g1[:, None] * lin(o, b + "attn.proj")
        h = ln(tok, mlp_eps) * (1 + sc2[:, None]) + s2[:, None]
        tok = tok + g2[:, None] * lin(gelu(lin(h, b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    shift, scale = lin(silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(ln(tok, 1e-6) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    cout = out.shape[-1] // (patch * patch)
    return out.reshape(B, gh, gw, patch, patch, cout).permute(0, 5, 1, 3, 2, 4).reshape(B, cout, height, width)


def diffusers_to_official_in_test(sd):
    """The test's own diffusers -> official renaming (independent of hcvision's converter)."""
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"]}
    e = "transformer_blocks.0.norm1.emb."
    for leaf in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{leaf}"] = sd[e + f"timestep_embedder.linear_1.{leaf}"]
        out[f"t_embedder.mlp.2.{leaf}"] = sd[e + f"timestep_embedder.linear_2.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = sd[f"proj_out_1.{leaf}"]
        out[f"final_layer.linear.{leaf}"] = sd[f"proj_out_2.{leaf}"]
    out["y_embedder.embedding_table.weight"] = sd[e + "class_embedder.embedding_table.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(depth):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[o + f"attn.qkv.{leaf}"] = torch.cat([sd[d + f"attn1.to_{n}.{leaf}"] for n in "qkv"])
            out[o + f"attn.proj.{leaf}"] = sd[d + f"attn1.to_out.0.{leaf}"]
            out[o + f"mlp.fc1.{leaf}"] = sd[d + f"ff.net.0.proj.{leaf}"]
            out[o + f"mlp.fc2.{leaf}"] = sd[d + f"ff.net.2.{leaf}"]
            out[o + f"adaLN_modulation.1.{leaf}"] = sd[d + f"norm1.linear.{leaf}"]
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    """A random diffusers DiT (zero-init tensors randomised too; embedder copies made identical) saved as safetensors,
    and the same weights in the official format (.pt, with DiT's stored pos_embed)."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                  num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        sd = model.state_dict()
        for k in sd:
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                sd[k].copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
    model.eval()
    folder = tmp_path_factory.mktemp("dit_ckpt")
    st_path = folder / "diffusers_dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st_path))
    official = diffusers_to_official_in_test(model.state_dict())
    official["pos_embed"] = torch.from_numpy(ref_pos_embed(32, 4)).float().unsqueeze(0)
    pt_path = folder / "official_dit.pt"
    torch.save({k: v.clone() for k, v in official.items()}, str(pt_path))
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 517, 999])
    y = torch.tensor([0, 7, 10])  # 10 = the null class
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    return dict(model=model, st=str(st_path), pt=str(pt_path), official=official, x=x, t=t, y=y, out=out)


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Random values for every non-connection parameter (so adaLN-Zero gates are not zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_conn." not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ---------------------------------------------------------------------------------------------------------------
# Registration and cfgs
# ---------------------------------------------------------------------------------------------------------------
def test_every_name_is_registered_with_cfg():
    names = set(timm.list_models("dit_*"))
    for size in ("s", "b", "l", "xl"):
        for p in (2, 4, 8):
            for suffix in SUFFIXES:
                assert f"dit_{size}_{p}_{suffix}" in names
    assert all(f"dit_digits_2_{s}" in names for s in SUFFIXES)
    cfg = timm.models.get_pretrained_cfg("dit_xl_2_dhc2").to_dict()
    assert cfg["input_size"] == (4, 32, 32) and cfg["num_classes"] == 1000
    assert timm.models.get_pretrained_cfg("dit_digits_2_res").to_dict()["input_size"] == (1, 8, 8)


def test_timm_fills_channels_and_classes_from_cfg():
    with torch.device("meta"):
        m = timm.create_model("dit_b_4_sfc2")
    assert (m.in_chans, m.num_classes, m.out_channels, m.input_size) == (4, 1000, 8, (32, 32))
    assert tuple(m.x_embedder.proj.weight.shape) == (768, 4, 4, 4)
    assert tuple(m.final_layer.linear.weight.shape) == (4 * 4 * 8, 768)
    assert tuple(m.y_embedder.embedding_table.weight.shape) == (1001, 768)
    assert m.connection == "sfc" and m.rate == 2 and m.qk_norm
    d = timm.create_model("dit_digits_2_mhc2")
    assert (d.in_chans, d.num_classes, d.out_channels, d.null_class) == (1, 10, 2, 10)
    # keyword overrides
    o = timm.create_model("dit_digits_2_shc2", connection="dhc", rate=4, qk_norm=False, learn_sigma=False,
                          class_dropout_prob=0.0, tanh=False, connection_options=dict(scale_init=0.1))
    assert (o.connection, o.rate, o.qk_norm, o.out_channels, o.null_class) == ("dhc", 4, False, 1, None)
    conn = o.blocks[0].attn_conn
    assert conn.use_tanh is False and conn.dynamic_alpha_scale.item() == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (meta device): DiT Table 1 / train.py counts (its frozen pos_embed included) and HC App. B
# ---------------------------------------------------------------------------------------------------------------
def dit_closed_form(C, depth, p, in_ch=4, classes=1000, grid=32):
    out_ch = 2 * in_ch
    embed = in_ch * p * p * C + C + (256 * C + C + C * C + C) + (classes + 1) * C
    block = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + (6 * C * C + 6 * C)
    final = (2 * C * C + 2 * C) + (C * p * p * out_ch + p * p * out_ch)
    pos = (grid // p) ** 2 * C
    return embed + depth * block + final, pos


SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}
PAPER_M = {"s": 33.0, "b": 130.5, "l": 458.1, "xl": 675.1}  # DiT /2 models, millions (its count includes pos_embed)


def _count(name, **kw):
    with torch.device("meta"):
        m = timm.create_model(name, **kw)
    return sum(p.numel() for p in m.parameters()), m


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts_match_dit(size):
    C, depth, heads = SIZES[size]
    for p in (2, 4, 8):
        n, m = _count(f"dit_{size}_{p}_res", qk_norm=False)
        params, pos = dit_closed_form(C, depth, p)
        assert n == params
        assert m.pos_embed.numel() == pos and "pos_embed" not in dict(m.named_parameters())
        if p == 2:
            assert round((n + pos) / 1e6, 1) == PAPER_M[size]
    n_qk, _ = _count(f"dit_{size}_2_res")  # QK-Norm: LayerNorm(head_dim) on q and k, weight and bias
    assert n_qk - dit_closed_form(C, depth, 2)[0] == depth * 4 * (C // heads)


def test_hc_parameter_overhead():
    C, depth, _ = SIZES["xl"]
    base = dit_closed_form(C, depth, 2)[0]
    for suffix in SUFFIXES[1:]:
        kind, rate = KIND_OF[suffix]
        n, _ = _count(f"dit_xl_2_{suffix}", qk_norm=False)
        assert n - base == 2 * depth * extra_parameters(kind, C, rate), suffix
    # SHC x2 closed form from HC Eq. 21: n(n+2) per connection
    assert _count("dit_xl_2_shc2", qk_norm=False)[0] - base == 2 * depth * 2 * 4


# ---------------------------------------------------------------------------------------------------------------
# The model is DiT: reference equality, init, structure
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["res", "dhc2", "sfc4", "mhc2"])
def test_random_weights_match_reference(suffix):
    """Random (non-zero) DiT weights, connections at init: the model is the reference DiT."""
    m = timm.create_model(f"dit_s_2_{suffix}", qk_norm=False, **TINY).eval()
    randomize(m)
    sd = {k: v for k, v in m.state_dict().items() if "_conn." not in k}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 900.0]), torch.tensor([3, 10])
    with torch.no_grad():
        out = m(x, t, y)
    assert out.shape == (2, 8, 8, 8)
    assert rel(out, reference_dit(sd, x, t, y, patch=2, heads=2)) < 1e-5


def test_fresh_model_is_adaln_zero_and_hc_scaled():
    torch.manual_seed(0)
    res = timm.create_model("dit_digits_2_res")
    out = res(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 9]))
    assert torch.count_nonzero(out) == 0  # zero-init final layer
    for blk in res.blocks:
        assert torch.count_nonzero(blk.adaLN_modulation[1].weight) == 0
    assert res.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert "pos_embed" not in res.state_dict()
    torch.manual_seed(0)
    shc4 = timm.create_model("dit_digits_2_shc4")
    torch.manual_seed(0)
    sfc4 = timm.create_model("dit_digits_2_sfc4")
    w = res.blocks[1].attn.proj.weight
    torch.testing.assert_close(shc4.blocks[1].attn.proj.weight, w / 2)  # 1/sqrt(4)
    torch.testing.assert_close(shc4.blocks[1].mlp.fc2.weight, res.blocks[1].mlp.fc2.weight / 2)
    torch.testing.assert_close(sfc4.blocks[1].attn.proj.weight, w)  # FC keeps the width: no scaling
    torch.testing.assert_close(shc4.blocks[1].attn.qkv.weight, res.blocks[1].attn.qkv.weight)


def test_sincos_matches_reference_and_non_square():
    from hcvision.layers import sincos_pos_embed_2d

    np.testing.assert_allclose(sincos_pos_embed_2d(64, 6).numpy(), ref_pos_embed(64, 6), atol=1e-6)
    e = sincos_pos_embed_2d(8, (2, 3))
    assert e.shape == (6, 8)
    torch.testing.assert_close(e[1, :4], e[4, :4])  # same column -> same first half
    torch.testing.assert_close(e[3, 4:], e[5, 4:])  # same row -> same second half


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_forward_backward_every_kind(suffix):
    torch.manual_seed(0)
    m = timm.create_model(f"dit_digits_2_{suffix}", depth=3)
    randomize(m, std=0.1)
    calls = []
    hooks = [mod.register_forward_hook(lambda mod, a, o: calls.append(mod.layer_index))
             for mod in m.modules() if isinstance(mod, Connection)]
    x = torch.randn(4, 1, 8, 8)
    out = m(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10]))
    assert out.shape == (4, 2, 8, 8) and torch.isfinite(out).all()
    assert calls == list(range(2 * len(m.blocks)))  # every connection is called as a module, in order
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    if suffix != "res":
        g = sum(p.grad.abs().sum() for n, p in m.named_parameters() if n.startswith("blocks.0.attn_conn"))
        assert g > 0
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion: diffusers (.safetensors) and official (.pt) -> same outputs, every kind
# ---------------------------------------------------------------------------------------------------------------
def test_reference_and_test_mapping_reproduce_diffusers(diffusers_dit):
    """Validates the reference DiT and the test's own renaming against diffusers itself (diffusers' numerics)."""
    d = diffusers_dit
    ref = reference_dit(d["official"], d["x"], d["t"], d["y"], patch=2, heads=2, freq_shift=1.0, mlp_eps=1e-5)
    assert rel(d["out"], ref) < 1e-5
    official = reference_dit(d["official"], d["x"], d["t"], d["y"], patch=2, heads=2)
    assert rel(official, ref) > 1e-2  # the two numerics really differ: the switch matters


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_diffusers_checkpoint_same_outputs(diffusers_dit, suffix):
    d = diffusers_dit
    m = timm.create_model(f"dit_s_2_{suffix}", pretrained=True, pretrained_cfg_overlay=dict(file=d["st"]),
                          qk_norm=False, numerics="diffusers", **TINY).eval()
    assert m.numerics == "diffusers"
    with torch.no_grad():
        out = m(d["x"], d["t"], d["y"])
    assert rel(out, d["out"]) <= 1e-5
    if suffix != "res":  # the connection is on the path: changing it changes the output
        with torch.no_grad():
            next(p for n, p in m.named_parameters() if n.startswith("blocks.1.mlp_conn")).add_(0.5)
            assert rel(m(d["x"], d["t"], d["y"]), d["out"]) > 1e-3


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_official_checkpoint_same_outputs(diffusers_dit, suffix):
    d = diffusers_dit
    m = timm.create_model(f"dit_s_2_{suffix}", pretrained=True, pretrained_cfg_overlay=dict(file=d["pt"]),
                          qk_norm=False, **TINY).eval()
    assert m.numerics == "dit"
    ref = reference_dit(d["official"], d["x"], d["t"], d["y"], patch=2, heads=2)
    # the same weights through diffusers' numerics (chosen at construction) give diffusers' output
    md = timm.create_model(f"dit_s_2_{suffix}", pretrained=True, pretrained_cfg_overlay=dict(file=d["pt"]),
                           qk_norm=False, numerics="diffusers", **TINY).eval()
    with torch.no_grad():
        out = m(d["x"], d["t"], d["y"])
        assert rel(out, ref) <= 1e-5
        assert rel(md(d["x"], d["t"], d["y"]), d["out"]) <= 1e-5


def test_diffusers_checkpoint_needs_explicit_numerics(diffusers_dit):
    """Loading never switches numerics: a diffusers file into a DiT-numerics model is refused, and the explicit
    conversion runs the same weights with DiT's numerics (= the reference DiT, not diffusers' output)."""
    d = diffusers_dit
    with pytest.raises(ValueError, match="numerics='diffusers'"):
        timm.create_model("dit_s_2_dhc2", pretrained=True, pretrained_cfg_overlay=dict(file=d["st"]),
                          qk_norm=False, **TINY)
    from safetensors.torch import load_file

    from hcvision.models import filter_checkpoint
    from hcvision.models.convert import diffusers_to_dit_state_dict

    m = timm.create_model("dit_s_2_dhc2", qk_norm=False, **TINY).eval()
    m.load_state_dict(filter_checkpoint(diffusers_to_dit_state_dict(load_file(d["st"])), m))
    assert m.numerics == "dit"
    with torch.no_grad():
        assert rel(m(d["x"], d["t"], d["y"]), reference_dit(d["official"], d["x"], d["t"], d["y"], patch=2,
                                                            heads=2)) <= 1e-5


def test_hcvision_checkpoint_roundtrip(tmp_path):
    m = timm.create_model("dit_digits_2_dhc2")
    randomize(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "_conn." in n:
                p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "m.safetensors"
    save_file(m.state_dict(), str(path))
    m2 = timm.create_model("dit_digits_2_dhc2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    args = (torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), torch.tensor([1, 2]))
    m.eval(), m2.eval()
    torch.testing.assert_close(m2(*args), m(*args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="attn_conn"):  # a DHC checkpoint does not fit an mHC model
        timm.create_model("dit_digits_2_mhc2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_conversion_errors(diffusers_dit, tmp_path):
    d = diffusers_dit
    load = lambda name, path, **kw: timm.create_model(  # noqa: E731
        name, pretrained=True, pretrained_cfg_overlay=dict(file=path),
        **dict(dict(qk_norm=False, numerics="diffusers", **TINY), **kw))
    with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight: checkpoint"):  # another width
        load("dit_s_2_res", d["pt"], embed_dim=64)
    with pytest.raises(ValueError, match=r"pos_embed"):  # another patch size
        load("dit_s_4_res", d["pt"])
    with pytest.raises(ValueError, match=r"y_embedder\.embedding_table\.weight"):  # another class count
        load("dit_s_2_res", d["st"], num_classes=12)
    with pytest.raises(ValueError, match=r"missing from checkpoint: \['blocks\.2"):  # deeper model
        load("dit_s_2_res", d["pt"], depth=3)
    with pytest.raises(ValueError, match="qk_norm=False"):
        load("dit_s_2_res", d["pt"], qk_norm=True)
    # per-block embedder copies that differ
    sd = {k: v.clone() for k, v in d["model"].state_dict().items()}
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_1\.bias"):
        load("dit_s_2_res", str(tmp_path / "bad.safetensors"))
    # a stored pos_embed that is not DiT's
    official = dict(d["official"], pos_embed=d["official"]["pos_embed"] + 0.1)
    torch.save(official, str(tmp_path / "badpos.pt"))
    with pytest.raises(ValueError, match="sin-cos"):
        load("dit_s_2_res", str(tmp_path / "badpos.pt"))
    # another family altogether
    save_file(timm.create_model("vit_digits_patch2_8_res").state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(ValueError, match="not a DiT checkpoint"):
        load("dit_s_2_res", str(tmp_path / "vit.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Training-time behaviour: label dropout, CFG, gradient checkpointing, compile
# ---------------------------------------------------------------------------------------------------------------
def test_label_dropout_only_in_training():
    m = timm.create_model("dit_digits_2_res", class_dropout_prob=0.5, depth=1)
    emb = m.y_embedder
    labels = torch.arange(2000) % 10
    table = emb.embedding_table.weight
    null = table[10]
    torch.manual_seed(0)
    emb.train()
    out = emb(labels)
    dropped = (out == null).all(-1)
    assert 0.45 < dropped.float().mean().item() < 0.55  # 2000 draws: 0.5 +- 0.011 (1 sd)
    torch.testing.assert_close(out[~dropped], table[labels[~dropped]])
    emb.eval()
    torch.testing.assert_close(emb(labels), table[labels])
    forced = emb(labels[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(forced, torch.stack([null, table[1], null, table[3]]))
    # through the model: eval is deterministic, training with dropout is not
    randomize(m)
    args = (torch.randn(16, 1, 8, 8), torch.full((16,), 300), torch.arange(16) % 10)
    m.eval()
    torch.testing.assert_close(m(*args), m(*args), rtol=0, atol=0)
    m.train()
    assert not torch.equal(m(*args), m(*args))


@pytest.mark.parametrize("channels", [3, None])
def test_forward_with_cfg_matches_manual(channels):
    m = timm.create_model("dit_s_2_dhc2", qk_norm=False, **TINY).eval()
    randomize(m)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 600]), torch.tensor([2, 7])
    null = torch.full_like(y, m.null_class)
    with torch.no_grad():
        cond, uncond = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)  # same batch layout
        out = m.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null]), 4.0,
                                 guidance_channels=channels)
    gc = 3 if channels is not None else 4
    guided = uncond[:, :gc] + 4.0 * (cond[:, :gc] - uncond[:, :gc])
    torch.testing.assert_close(out[:2, :gc], guided)
    torch.testing.assert_close(out[2:, :gc], guided)
    torch.testing.assert_close(out[:2, gc:], cond[:, gc:])
    torch.testing.assert_close(out[2:, gc:], uncond[:, gc:])


@pytest.mark.parametrize("suffix", ["dhc2", "mhc2", "sfc2"])
def test_grad_checkpointing_same_outputs_and_grads(suffix):
    torch.manual_seed(0)
    m = timm.create_model(f"dit_digits_2_{suffix}", class_dropout_prob=0.0, depth=2)
    randomize(m, std=0.1)
    args = (torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    ref = m(*args)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    out = m(*args)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    m = timm.create_model("dit_digits_2_dhc2").eval()
    randomize(m, std=0.1)
    args = (torch.randn(2, 1, 8, 8), torch.tensor([1, 900]), torch.tensor([3, 10]))
    with torch.no_grad():
        ref = m(*args)
        out = torch.compile(m, fullgraph=True)(*args)  # fullgraph: no graph breaks in the connections or checks
    assert rel(out, ref) < 1e-4  # inductor fuses and reorders float32 sums


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    m = timm.create_model("dit_digits_2_res")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        m(torch.randn(2, 4, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        m(torch.randn(2, 1, 16, 16), t, y)
    with pytest.raises(ValueError, match="integer tensor"):
        m(x, t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        m(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match="even batch"):
        m.forward_with_cfg(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 10]), 1.5)
    with pytest.raises(ValueError, match=r"guidance_channels.*\[1, 1\]"):
        m.forward_with_cfg(x, t, torch.tensor([1, 10]), 1.5, guidance_channels=3)
    with pytest.raises(ValueError, match="divisible"):
        timm.create_model("dit_digits_2_res", input_size=9)
    with pytest.raises(ValueError, match="unknown connection kind"):
        timm.create_model("dit_digits_2_res", connection="hyper")
    with pytest.raises(ValueError, match="not divisible by 5"):
        timm.create_model("dit_digits_2_sfc2", rate=5)
    with pytest.raises(ValueError, match="numerics"):
        timm.create_model("dit_digits_2_res", numerics="ldm")
    with pytest.raises(ValueError, match="disagree"):
        dit.HCDiT(input_size=8, img_size=16)
