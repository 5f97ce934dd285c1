"""Pretrained loading that adapts like timm: another ``num_classes`` (fresh head) or ``in_chans`` (timm's first-conv
adaptation) from a vanilla or hcvision checkpoint, for every connection kind; wrong checkpoints still name their
tensors; timm ``train.py`` checkpoints load safely through timm's path and through ``hcvision.io`` and
``hcvision.models.loading``."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file

import hcvision  # noqa: F401  (registers the models)
from hcvision.cli import UsageError
from hcvision.io import load_weights
from hcvision.models.loading import load_model

SUFFIXES = ["res", "shc2", "shc4", "dhc2", "dhc4", "sfc2", "sfc4", "dfc2", "dfc4", "mhc2", "mhc4"]
DEPTH = 2  # a 2-block vit_tiny keeps every test cheap; the full-depth call is tested once below


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Move every parameter off its init (zero biases, unit norm weights) so a wrong load is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def vanilla_tiny(tmp_path_factory):
    """A 1000-class, 3-channel vanilla timm ViT-Tiny (2 blocks), random, saved as safetensors."""
    torch.manual_seed(0)
    model = _perturb(timm.create_model("vit_tiny_patch16_224", depth=DEPTH), seed=0)
    path = _save(model, tmp_path_factory.mktemp("vanilla") / "vit_tiny.safetensors")
    return model, path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_new_head_keeps_pre_logit_features(vanilla_tiny, suffix):
    """num_classes=10 from a 1000-class file: timm drops the head (fresh 10-class head), the connections start at
    their Pre-Norm-equivalent init, so the pre-logit features are the vanilla model's (the final norm makes the HC
    read-out scale irrelevant)."""
    vanilla, path = vanilla_tiny
    model = timm.create_model(f"vit_tiny_patch16_224_{suffix}", pretrained=True, num_classes=10, depth=DEPTH,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    assert model.head.weight.shape == (10, 192)
    x = torch.randn(2, 3, 224, 224)
    feats = _pre_logits(model, x)
    assert _rel(feats, _pre_logits(vanilla, x)) <= 1e-5
    with torch.no_grad():  # the logits are the fresh head applied to those features
        torch.testing.assert_close(model(x), model.head(feats))
    if suffix != "res":  # connection parameters are the model's init, not absent: they are on the path
        assert any("_conn." in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_one_input_channel_is_adapted(vanilla_tiny, suffix):
    """in_chans=1: timm sums the patch embedding over the input channels, so a grey image gives the logits the
    vanilla model gives the same image repeated on 3 channels (the head is kept: same 1000 classes)."""
    vanilla, path = vanilla_tiny
    model = timm.create_model(f"vit_tiny_patch16_224_{suffix}", pretrained=True, in_chans=1, depth=DEPTH,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16)
    grey = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        out, ref = model(grey), vanilla(grey.expand(-1, 3, -1, -1))
    assert out.shape == (2, 1000) and _rel(out, ref) <= 1e-5


def test_full_size_timm_call_with_new_head_and_channels(tmp_path):
    """The issue's call on the real 12-block ViT-Tiny: pretrained=True, num_classes=10 and in_chans=1 at once."""
    torch.manual_seed(1)
    vanilla = _perturb(timm.create_model("vit_tiny_patch16_224"), seed=1)
    path = _save(vanilla, tmp_path / "vit_tiny_1000.safetensors")
    model = timm.create_model("vit_tiny_patch16_224_dhc2", pretrained=True, num_classes=10, in_chans=1,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    grey = torch.randn(1, 1, 224, 224)
    assert model(grey).shape == (1, 10)
    assert _rel(_pre_logits(model, grey), _pre_logits(vanilla, grey.expand(-1, 3, -1, -1))) <= 1e-5


def test_hcvision_checkpoint_keeps_its_connections_with_a_new_head(tmp_path):
    """A trained hcvision checkpoint (connections off their init) into a model with another class count: the
    connections come from the file, only the head is fresh."""
    src = _perturb(timm.create_model("vit_digits_patch2_8_dhc2"), seed=2, std=0.05)
    path = _save(src, tmp_path / "dhc2.safetensors")
    model = timm.create_model("vit_digits_patch2_8_dhc2", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    torch.testing.assert_close(model.blocks[1].mlp_conn.static_beta, src.blocks[1].mlp_conn.static_beta)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(_pre_logits(model, x), _pre_logits(src, x), rtol=0, atol=0)
    assert model(x).shape == (4, 3)


def test_other_size_or_family_still_names_the_tensors(tmp_path, vanilla_tiny):
    small = timm.create_model("vit_small_patch16_224", depth=DEPTH)
    path = _save(small, tmp_path / "vit_small.safetensors")
    with pytest.raises(ValueError, match=r"cls_token: checkpoint \(1, 1, 384\) vs model \(1, 1, 192\)"):
        timm.create_model("vit_tiny_patch16_224_dhc2", pretrained=True, num_classes=10, depth=DEPTH,
                          pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(ValueError, match=r"missing from checkpoint: .*blocks\.2\."):  # a deeper model
        timm.create_model("vit_tiny_patch16_224_shc2", pretrained=True, num_classes=10, depth=DEPTH + 1,
                          pretrained_cfg_overlay=dict(file=vanilla_tiny[1]))
    dit = _save(timm.create_model("dit_digits_2_res"), tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match=r"not in model: \['blocks\.0\.adaLN_modulation\.1\.bias'"):
        timm.create_model("vit_tiny_patch16_224_dhc2", pretrained=True, num_classes=10, in_chans=1, depth=DEPTH,
                          pretrained_cfg_overlay=dict(file=dit))
    # without an adaptation to make (same class count as the cfg), a head of another size is an error, not a reset
    other = _save(timm.create_model("vit_digits_patch2_8_res", num_classes=1000), tmp_path / "digits_1000.safetensors")
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(1000, 64\) vs model \(10, 64\)"):
        timm.create_model("vit_digits_patch2_8_res", pretrained=True, pretrained_cfg_overlay=dict(file=other))


# ---------------------------------------------------------------------------------------------------------------
# timm train.py checkpoints (.pth.tar): {"state_dict", "state_dict_ema", "optimizer", "args": Namespace, ...}
# ---------------------------------------------------------------------------------------------------------------
class NotWeights:
    """Stands for any object a checkpoint should not make us unpickle."""


def _train_py_checkpoint(path, model: torch.nn.Module, ema: torch.nn.Module, extra=None) -> None:
    """The layout of timm's CheckpointSaver (train.py), with the argparse namespace it stores."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    state = {"epoch": 3, "arch": "vit_digits_patch2_8_dhc2", "state_dict": model.state_dict(),
             "optimizer": opt.state_dict(), "version": 2, "metric": 91.5, "state_dict_ema": ema.state_dict(),
             "args": argparse.Namespace(model="vit_digits_patch2_8_dhc2", num_classes=10, in_chans=1, lr=0.1)}
    torch.save(dict(state, **(extra or {})), path)


def test_timm_train_py_checkpoint_loads_safely(tmp_path):
    raw = _perturb(timm.create_model("vit_digits_patch2_8_dhc2"), seed=3, std=0.05)
    ema = _perturb(timm.create_model("vit_digits_patch2_8_dhc2"), seed=4, std=0.05)
    path = tmp_path / "model_best.pth.tar"
    _train_py_checkpoint(path, raw, ema)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want_ema, want_raw = ema(x), raw(x)
    assert _rel(want_ema, want_raw) > 1e-3  # the two weight sets really differ

    # timm's pretrained path: the EMA weights (timm's use_ema=True), connections included
    model = timm.create_model("vit_digits_patch2_8_dhc2", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_ema, rtol=0, atol=0)

    # hcvision.io.load_weights picks EMA or raw; load_model rebuilds the named model from either
    sd_ema, meta = load_weights(path, prefer_ema=True)
    sd_raw, _ = load_weights(path, prefer_ema=False)
    assert meta == {} and torch.equal(sd_ema["head.weight"], ema.head.weight)
    assert torch.equal(sd_raw["head.weight"], raw.head.weight)
    for use_ema, want in ((True, want_ema), (False, want_raw)):
        loaded, info = load_model(path, model_name="vit_digits_patch2_8_dhc2", ema=use_ema)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        assert info["model"] == "vit_digits_patch2_8_dhc2"


def test_checkpoint_with_foreign_objects_is_refused_unopened(tmp_path):
    model = timm.create_model("vit_digits_patch2_8_res")
    path = tmp_path / "evil.pth.tar"
    _train_py_checkpoint(path, model, model, extra={"payload": NotWeights()})
    with pytest.raises(UsageError, match=r"could not load .*evil\.pth\.tar.* safely"):
        load_weights(path)
    with pytest.raises(UsageError, match="safely"):
        load_model(path, model_name="vit_digits_patch2_8_res")
    with pytest.raises(RuntimeError, match="weights_only"):  # timm's own loader refuses it too
        timm.create_model("vit_digits_patch2_8_res", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_load_model_requires_an_exact_fit(tmp_path, vanilla_tiny):
    """``load_model`` rebuilds a model as recorded: no head reset, a head of another size is named."""
    _, path = vanilla_tiny
    model, _ = load_model(path, model_name="vit_tiny_patch16_224_sfc2", model_kwargs=dict(depth=DEPTH))
    assert model.head.weight.shape == (1000, 192)
    with pytest.raises(UsageError, match=r"head\.weight: checkpoint \(1000, 192\) vs model \(10, 192\)"):
        load_model(path, model_name="vit_tiny_patch16_224_sfc2", model_kwargs=dict(depth=DEPTH, num_classes=10))
