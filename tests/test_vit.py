"""HC-ViT zoo: timm compliance, upcycling equivalence, parameter counts (HC App. B), bad input."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import hcvision  # noqa: F401  (registers the models)
from hcvision.connections import extra_parameters
from hcvision.models.vit import VIT_SIZES

SUFFIXES = ["res", "shc2", "shc4", "dhc2", "dhc4", "sfc2", "sfc4", "dfc2", "dfc4", "mhc2", "mhc4",
            "mhclite2", "mhclite4", "kromhc2", "kromhc4"]
SIZES = ["tiny", "small", "base", "large", "huge"]


def test_every_listed_name_is_registered():
    names = set(timm.list_models("vit_*_patch16_224_*"))
    for size in SIZES:
        for suffix in SUFFIXES:
            assert f"vit_{size}_patch16_224_{suffix}" in names
    assert "vit_base_patch16_224_dhc2" in timm.list_models("*_dhc*")
    assert all(timm.models.is_model(f"vit_digits_patch2_8_{s}") for s in SUFFIXES)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tiny_forward_backward_cfg(suffix):
    name = f"vit_tiny_patch16_224_{suffix}"
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and len(cfg["mean"]) == 3 and cfg["num_classes"] == 1000
    assert model.get_submodule(cfg["first_conv"]) is not None
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    x = torch.randn(1, *cfg["input_size"])
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    # the first block's connection gets a gradient (it is on the path)
    if not suffix.startswith("res"):
        conn_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "blocks.0.attn_conn" in n]
        assert sum(conn_grads) > 0


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_digits_intermediates_features_and_checkpointing(suffix):
    torch.manual_seed(0)
    model = timm.create_model(f"vit_digits_patch2_8_{suffix}").eval()
    x = torch.randn(3, 1, 8, 8)
    feats = model.forward_features(x)
    final, inter = model.forward_intermediates(x, indices=[1, 5])
    torch.testing.assert_close(final, feats)
    assert [t.shape for t in inter] == [(3, 64, 4, 4)] * 2
    only = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in only] == [(3, 16, 64)] * 2
    logits = model(x)
    torch.testing.assert_close(model.forward_head(feats), logits)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 64)
    # gradient checkpointing: same outputs and gradients
    model.train()
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)
    # features_only through timm's getter
    fmodel = timm.create_model(f"vit_digits_patch2_8_{suffix}", features_only=True, out_indices=(2, 5))
    fm = fmodel(x)
    assert [t.shape for t in fm] == [(3, 64, 4, 4)] * 2


def test_reset_classifier_and_dynamic_img_size():
    model = timm.create_model("vit_digits_patch2_8_dhc2", dynamic_img_size=True)
    model.reset_classifier(3)
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 3)


def test_timm_optimizer_ema_and_layer_decay_work():
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    model = timm.create_model("vit_digits_patch2_8_dhc2")
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.3)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    blk = model.blocks[0]
    assert id(blk.attn_conn.static_alpha) in no_decay and id(blk.attn_conn.static_beta) in no_decay
    assert id(blk.attn_conn.dynamic_weight) in decay
    assert "blocks.0.attn_conn.static_alpha" in model.no_weight_decay()
    # layer-wise lr decay uses group_matcher: connection params belong to their block
    opt2 = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.3, layer_decay=0.7)
    assert len(opt2.param_groups) > 2
    ema = ModelEmaV3(model, decay=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    ema.update(model)
    assert not torch.equal(ema.module.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("suffix", ["shc2", "dhc4", "mhc2"])
def test_out_proj_init_scaled_by_sqrt_n(suffix):
    torch.manual_seed(0)
    res = timm.create_model("vit_digits_patch2_8_res")
    torch.manual_seed(0)
    hc = timm.create_model(f"vit_digits_patch2_8_{suffix}")
    n = int(suffix[-1])
    for a, b in zip(res.blocks, hc.blocks):
        torch.testing.assert_close(b.attn.proj.weight, a.attn.proj.weight / math.sqrt(n))
        torch.testing.assert_close(b.mlp.fc2.weight, a.mlp.fc2.weight / math.sqrt(n))
        torch.testing.assert_close(b.mlp.fc1.weight, a.mlp.fc1.weight)


def test_qk_norm_flag():
    plain = timm.create_model("vit_digits_patch2_8_dhc2")
    assert isinstance(plain.blocks[0].attn.q_norm, torch.nn.Identity)  # off by default (paper's ViT recipe)
    normed = timm.create_model("vit_digits_patch2_8_dhc2", qk_norm=True)
    assert isinstance(normed.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    assert normed(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_keyword_overrides():
    model = timm.create_model("vit_digits_patch2_8_dhc2", connection="sfc", rate=4)
    assert model.connection == "sfc" and model.blocks[0].attn_conn.num_streams == 4
    with pytest.raises(ValueError, match="'tanh' does not apply to kind 'sfc'.*dhc, dfc"):  # static kinds: no tanh
        timm.create_model("vit_digits_patch2_8_dhc2", connection="sfc", rate=4, tanh=False)
    model = timm.create_model("vit_digits_patch2_8_dhc2", tanh=False)
    assert model.blocks[0].attn_conn.use_tanh is False
    model = timm.create_model("vit_digits_patch2_8_mhc2", connection_options=dict(sinkhorn_iters=5))
    assert model.blocks[3].mlp_conn.sinkhorn_iters == 5


# ---------------------------------------------------------------------------------------------------------
# Parameter counts on the meta device (HC App. B)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_param_count_equals_vanilla_plus_appendix_b(size, suffix):
    with torch.device("meta"):
        vanilla = timm.create_model(f"vit_{size}_patch16_224")
        hc = timm.create_model(f"vit_{size}_patch16_224_{suffix}")
    kind = {"res": "residual"}.get(suffix, suffix[:-1])
    rate = 1 if suffix == "res" else int(suffix[-1])
    depth, dim = len(vanilla.blocks), vanilla.embed_dim
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(hc) == count(vanilla) + 2 * depth * extra_parameters(kind, dim, rate)


# ---------------------------------------------------------------------------------------------------------
# Upcycling a vanilla timm ViT
# ---------------------------------------------------------------------------------------------------------
def _vanilla_digits(tmp_path, fmt):
    torch.manual_seed(1)
    args = dict(VIT_SIZES["vit_digits_patch2_8"])
    vanilla = VisionTransformer(**args).eval()
    with torch.no_grad():  # make the head and norms non-trivial so a wrong load is visible
        for p in vanilla.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / f"vanilla.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in vanilla.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": vanilla.state_dict()}, path)
    return vanilla, path


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_upcycle_vanilla_checkpoint_gives_same_logits(tmp_path, suffix, fmt):
    vanilla, path = _vanilla_digits(tmp_path, fmt)
    hc = timm.create_model(f"vit_digits_patch2_8_{suffix}", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref, out = vanilla(x), hc(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_upcycle_real_size_tiny_vit(tmp_path):
    torch.manual_seed(0)
    vanilla = timm.create_model("vit_tiny_patch16_224").eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vanilla.state_dict().items()}, str(path))
    hc = timm.create_model("vit_tiny_patch16_224_dhc4", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, out = vanilla(x), hc(x)
    assert (out - ref).norm() / ref.norm() <= 1e-5


def test_hcvision_checkpoint_round_trip(tmp_path):
    src = timm.create_model("vit_digits_patch2_8_dhc2").eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move connections away from init
    path = tmp_path / "hc.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = timm.create_model("vit_digits_patch2_8_dhc2", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(dst(x), src(x))


def test_checkpoint_of_another_size_names_tensors(tmp_path):
    other = VisionTransformer(**dict(VIT_SIZES["vit_digits_patch2_8"], embed_dim=32, num_heads=2))
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError,
                       match=r"mismatched shapes: .*cls_token: checkpoint \(1, 1, 32\) vs model \(1, 1, 64\)"):
        timm.create_model("vit_digits_patch2_8_shc2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_checkpoint_of_another_kind_names_tensors(tmp_path):
    src = timm.create_model("vit_digits_patch2_8_dhc2")
    path = tmp_path / "dhc.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="not in model: .*dynamic_weight"):
        timm.create_model("vit_digits_patch2_8_shc2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_wrong_image_size_and_channels_raise_clear_errors():
    model = timm.create_model("vit_digits_patch2_8_dhc2")
    with pytest.raises(ValueError, match="expected images of size 8x8, got 16x16.*dynamic_img_size=True"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="takes 1 input channels, got 3"):
        model(torch.randn(1, 3, 8, 8))


def test_bad_connection_arguments():
    with pytest.raises(ValueError, match="accepted: residual, shc, dhc, sfc, dfc, mhc"):
        timm.create_model("vit_digits_patch2_8_dhc2", connection="hyper")
    with pytest.raises(ValueError, match="not divisible"):
        timm.create_model("vit_digits_patch2_8_sfc2", rate=3)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [s for s in SUFFIXES if s not in ("mhclite4", "kromhc4")])  # n = 2 covers their code
def test_torch_compile_trains(suffix):
    torch.manual_seed(0)
    model = timm.create_model(f"vit_digits_patch2_8_{suffix}", depth=1)  # compile time grows with depth
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 8, 8)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_weights_index_lists_only_existing_files(tmp_path, monkeypatch):
    from hcvision.models._registry import local_weights

    (tmp_path / "real.safetensors").write_bytes(b"x")
    (tmp_path / "index.json").write_text(
        '{"a.t1": {"file": "real.safetensors"}, "b.t2": {"file": "missing.safetensors"}, "c.t3": {"top1": 1}}')
    monkeypatch.setenv("HCV_WEIGHTS_DIR", str(tmp_path))
    assert list(local_weights()) == ["a.t1"]


def test_committed_weights_load_as_timm_tags():
    import json
    from pathlib import Path

    index = json.loads((Path(__file__).resolve().parents[1] / "weights" / "index.json").read_text())
    assert index, "weights/index.json lists no weights"
    for tagged in index:
        assert tagged in timm.list_pretrained(), tagged
        model = timm.create_model(tagged, pretrained=True)
        assert model.num_classes == index[tagged]["num_classes"]



def _post_bias_update_spread(suffix: str, **options) -> float:
    """One SGD step on random data; how much the per-stream updates of ``b_post`` differ (largest difference from
    stream 0's, over all sublayers), relative to the largest update. Plain SGD: the update is the gradient (Adam's
    first step is only its sign, which equal-sign gradients share)."""
    torch.manual_seed(0)
    model = timm.create_model(f"vit_digits_patch2_8_{suffix}", connection_options=options or None)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    conns = [c for block in model.blocks for c in (block.attn_conn, block.mlp_conn)]
    before = torch.stack([c.bias_post.detach().clone() for c in conns])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    update = torch.stack([c.bias_post.detach() for c in conns]) - before
    return ((update - update[:, :1]).abs().amax() / update.abs().amax()).item()


@pytest.mark.parametrize("suffix", ["mhc2", "mhc4", "mhclite2", "mhclite4", "kromhc2", "kromhc4"])
def test_mhc_family_streams_separate_after_one_step(suffix):
    # The streams start as n copies of the embedding. With H_pre = 1/n on every stream (pre_init=1/n, the former
    # init) the network is symmetric under permuting them: every stream gets the same gradient, so the per-stream
    # parameters move alike and the streams stay equal for ever. With H_pre favouring stream k mod n, the gradient
    # reaching stream i carries H_pre,i, so the streams' H_post already move differently in the first step (they
    # then make the streams differ; the stream outputs themselves move by only ~1e-6 in one step, too close to
    # rounding to test here). Measured: 0.07 to 0.2 against ~1e-7 for the symmetric init.
    rate = int(suffix[-1])
    assert _post_bias_update_spread(suffix) > 1e-2
    assert _post_bias_update_spread(suffix, pre_init=1 / rate) < 1e-5
