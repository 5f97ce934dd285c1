"""The shipped configs/cls/*.yaml parse, match the paper's recipe and build their models (meta device)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "configs" / "cls").glob("vit_*.yaml"))


def _train_cls():
    from hcvision import train_cls

    return train_cls


def test_all_six_paper_configs_exist():
    names = {p.stem for p in PAPER}
    assert names == {f"vit_{s}_{k}" for s in ("base", "large") for k in ("res", "shc2", "dhc2")}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_values_and_model(path):
    import timm

    import hcvision  # noqa: F401
    from hcvision.engine import build_optimizer, parse_config

    tc = _train_cls()
    cfg = parse_config(tc.ClsConfig, ["--config", str(path)])
    # HC paper, Table 12 (ViT on ImageNet-1k).
    assert (cfg.lr, cfg.global_batch_size, cfg.betas, cfg.eps) == (3e-3, 4096, (0.9, 0.999), 1e-8)
    assert (cfg.opt, cfg.weight_decay, cfg.lr_schedule, cfg.warmup_steps) == ("adamw", 0.3, "cosine", 10000)
    assert (cfg.clip_grad, cfg.mixup, cfg.epochs, cfg.mixed_precision, cfg.img_size) == (1.0, 0.2, 300, "bf16", 224)
    assert cfg.model_kwargs["proj_drop_rate"] == 0.1
    size, kind = path.stem.split("_")[1:]
    assert cfg.model == f"vit_{size}_patch16_224_{kind}"
    with torch.device("meta"):
        model = timm.create_model(cfg.model, num_classes=1000, **cfg.model_kwargs)
    n = sum(p.numel() for p in model.parameters())
    assert (80e6 < n < 95e6) if size == "base" else (290e6 < n < 320e6)
    # Weight decay: none on the static connection parameters, decay on the dynamic ones.
    opt = build_optimizer(model, cfg)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    for name, p in names.items():
        expected = 0.0 if (p.ndim <= 1 or name in nwd) else 0.3
        assert decay_of[id(p)] == expected, name
    if kind != "res":
        static = [n for n in nwd if n.startswith("blocks.")]
        assert static, "static connection parameters must be excluded from weight decay"
        assert all(decay_of[id(names[n])] == 0.0 for n in static)


@pytest.mark.parametrize("kind", ["dhc2", "res"])
def test_digits_configs_are_the_defaults(kind):
    from hcvision.engine import config_to_dict, parse_config

    tc = _train_cls()
    cfg = parse_config(tc.ClsConfig, ["--config", str(REPO / "configs" / "cls" / f"digits_{kind}.yaml")])
    default = parse_config(tc.ClsConfig, [])
    diff = {k for k, v in config_to_dict(cfg).items() if config_to_dict(default)[k] != v}
    assert diff <= {"model", "output_dir"}
    assert cfg.model == f"vit_digits_patch2_8_{kind}"


def test_per_device_batch_for_paper_recipe_on_8_gpus():
    from hcvision.engine import ConfigError, per_device_batch_size

    assert per_device_batch_size(4096, 8, 1) == 512
    assert per_device_batch_size(4096, 8, 4) == 128
    with pytest.raises(ConfigError, match="not divisible"):
        per_device_batch_size(4096, 6, 1)
