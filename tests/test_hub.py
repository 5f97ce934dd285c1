"""Hub format: ``hcvision.models.save_pretrained`` writes timm's ``save_for_hf`` layout (safetensors + config.json
whose ``model_args`` hold kind, rate, options, numerics) and ``timm.create_model("local-dir:...")`` rebuilds the same
model bit for bit."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import hcvision  # noqa: F401  (registers the architectures: needed before create_model("local-dir:..."))
from hcvision.models import hub_model_args, save_pretrained

SUFFIXES = ["res", "shc2", "shc4", "dhc2", "dhc4", "sfc2", "sfc4", "dfc2", "dfc4", "mhc2", "mhc4"]


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Every parameter off its init (connections included), so a reload that fell back to an init shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _round_trip(model: torch.nn.Module, directory) -> torch.nn.Module:
    save_pretrained(model, directory)
    return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_vit_round_trips_bit_exactly(tmp_path, suffix):
    model = _perturb(timm.create_model(f"vit_digits_patch2_8_{suffix}"))
    loaded = _round_trip(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == f"vit_digits_patch2_8_{suffix}"
    assert {k: config["model_args"][k] for k in ("connection", "rate")} == hub_model_args(model)
    assert (loaded.connection, loaded.rate) == (model.connection, model.rate)
    _assert_same_state(model, loaded)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_vit_options_and_new_head_round_trip(tmp_path):
    """Keyword overrides (another kind and rate, connection options, tanh) and a fine-tuned head are rebuilt from
    config.json alone."""
    model = _perturb(timm.create_model("vit_digits_patch2_8_dhc2", connection="mhc", rate=4, num_classes=3,
                                       connection_options=dict(sinkhorn_iters=7)))
    loaded = _round_trip(model, tmp_path / "mhc")
    assert (loaded.connection, loaded.rate, loaded.num_classes) == ("mhc", 4, 3)
    assert loaded.blocks[2].attn_conn.sinkhorn_iters == 7
    _assert_same_state(model, loaded)
    untanh = _perturb(timm.create_model("vit_digits_patch2_8_dfc4", tanh=False))
    loaded = _round_trip(untanh, tmp_path / "dfc")
    assert loaded.blocks[0].mlp_conn.use_tanh is False
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), untanh(x))


@pytest.mark.parametrize("name,kwargs", [
    ("dit_digits_2_dhc2", {}),
    ("dit_s_2_mhc2", dict(embed_dim=32, depth=2, num_heads=2, input_size=8, num_classes=10, qk_norm=False,
                          numerics="diffusers")),
])
def test_dit_round_trips_bit_exactly(tmp_path, name, kwargs):
    model = _perturb(timm.create_model(name, **kwargs))
    loaded = _round_trip(model, tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert config["model_args"]["numerics"] == model.numerics
    assert (loaded.numerics, loaded.qk_norm, loaded.input_size, loaded.in_chans) == (
        model.numerics, model.qk_norm, model.input_size, model.in_chans)
    _assert_same_state(model, loaded)
    x = torch.randn(2, model.in_chans, *model.input_size)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_save_pretrained_refuses_what_it_cannot_rebuild(tmp_path):
    from hcvision.models import HCVisionTransformer

    bare = HCVisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                               num_heads=2, connection="shc", rate=2)
    with pytest.raises(ValueError, match="timm.create_model"):
        save_pretrained(bare, tmp_path / "bare")
    with pytest.raises(ValueError, match="hcvision model"):
        save_pretrained(timm.create_model("vit_tiny_patch16_224", depth=1), tmp_path / "vanilla")
    assert not (tmp_path / "vanilla").exists() or not any((tmp_path / "vanilla").iterdir())
