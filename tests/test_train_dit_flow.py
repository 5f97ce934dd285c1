"""train_dit.py with objective=flow and REPA: the loss against independent computations, a flow run whose weights
record their sampling path and sample through ``python -m hcvision.sample``, REPA end to end on the digits DiT with a
small random stand-in encoder read from a local file, the SiT/REPA configs, and bad input (exit 2, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hcvision.models.dit  # noqa: F401  (registers the DiT names)
from hcvision import train_dit
from hcvision.cli import run_cli
from hcvision.diffusion import DiffusionLoss, make_objective
from hcvision.diffusion.repa import REPA, alignment_loss
from hcvision.engine import parse_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model_kwargs.embed_dim=32", "model_kwargs.depth=2", "model_kwargs.num_heads=2", "progress_bar=false",
        "tensorboard=false", "global_batch_size=32", "log_every=1"]
# A DINOv2-shaped stand-in: the digits DiT has a 4x4 token grid, so the encoder reads 4 * 14 = 56 px images.
ENC_KW = dict(embed_dim=24, depth=1, num_heads=2)
ENC_ARGS = [f"repa_encoder_kwargs.{k}={v}" for k, v in ENC_KW.items()] + ["repa_encoder_model=vit_small_patch14_dinov2"]


class _OneProcess:
    num_processes = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(5)
    enc = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **ENC_KW)
    path = tmp_path_factory.mktemp("enc") / "dinov2_standin.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return path, {k: v.clone() for k, v in enc.state_dict().items()}


def tiny_dit(seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model("dit_digits_2_shc2", embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():  # adaLN-Zero starts at a zero output: perturb so the loss depends on the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_flow_loss_is_the_velocity_mse_with_the_drawn_t_and_noise():
    """SiT Eq. 6 recomputed by hand from the same draws: t first, then the noise (the engine's RNG order)."""
    model, x, y = tiny_dit(), torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 3, 5, 9])
    torch.manual_seed(7)
    loss, n = DiffusionLoss(_OneProcess(), "flow", "logit_normal")(model, (x, y))
    torch.manual_seed(7)
    z = torch.randn(4)  # logit-normal(0, 1) draw
    t = torch.sigmoid(z).clamp(1e-5, 1 - 1e-5)
    eps = torch.randn_like(x)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    v = model(x_t, 999.0 * t, y)[:, :1]
    assert n == 4
    torch.testing.assert_close(loss, ((v - (eps - x)) ** 2).mean())


def test_ddpm_loss_is_the_objectives_hybrid_loss():
    model, x, y = tiny_dit(), torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 3, 5, 9])
    torch.manual_seed(3)
    loss, _ = DiffusionLoss(_OneProcess())(model, (x, y))
    torch.manual_seed(3)
    ddpm = make_objective("ddpm")
    ref = ddpm.training_losses(model, x, ddpm.sample_timesteps(4, device=x.device), y=y)["loss"].mean()
    torch.testing.assert_close(loss, ref)


def test_repa_term_is_added_from_the_same_forward_with_the_clean_images():
    """``L = L_flow + lambda * L_REPA`` (REPA Eq. 8), L_REPA from the block's read-out (Eq. 7), encoder on x0."""
    torch.manual_seed(1)
    enc = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **ENC_KW).eval()
    model = tiny_dit()
    repa = REPA(model, enc, block=1, weight=0.5, projector_dim=16)
    x, y = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([1, 2, 3])
    torch.manual_seed(2)
    loss, _ = DiffusionLoss(_OneProcess(), "flow", "uniform", repa=repa)(repa, (x, y))
    torch.manual_seed(2)
    plain = DiffusionLoss(_OneProcess(), "flow", "uniform")(model, (x, y))[0]
    torch.manual_seed(2)
    t = torch.rand(3).clamp(1e-5, 1 - 1e-5)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * torch.randn_like(x)
    tokens = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: tokens.append(o.sum(dim=2)))  # SHC: stream sum
    model(x_t, 999.0 * t, y)
    hook.remove()
    img = torch.nn.functional.interpolate(((x + 1) / 2).expand(-1, 3, -1, -1), size=(56, 56), mode="bicubic")
    mean, std = torch.tensor(enc.pretrained_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(enc.pretrained_cfg["std"])
    feats = enc.forward_features((img - mean) / std.view(1, 3, 1, 1))[:, enc.num_prefix_tokens:]
    l_repa = alignment_loss(repa.projector(tokens[0]), feats).mean()
    torch.testing.assert_close(loss, plain + 0.5 * l_repa)
    assert l_repa.abs() > 1e-3  # the term is not vanishing, so the comparison can fail


def test_repa_keeps_the_dits_no_weight_decay_list():
    from timm.optim import create_optimizer_v2

    torch.manual_seed(1)
    enc = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **ENC_KW)
    repa = REPA(tiny_dit(), enc, block=1, weight=0.5, projector_dim=16)
    static = {id(p) for n, p in repa.model.named_parameters() if n in repa.model.no_weight_decay()}
    assert static  # SHC has static connection parameters
    opt = create_optimizer_v2(repa, opt="adamw", lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not static & decayed and any(g["weight_decay"] > 0 for g in opt.param_groups)


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.slow
def test_flow_run_records_its_sampler_and_the_sampling_cli_follows_it(tmp_path, capsys):
    from hcvision.sample import main as sample_main

    out = tmp_path / "run"
    rc = train_dit.main(TINY + [f"output_dir={out}", "objective=flow", "time_sampling=logit_normal", "max_steps=3",
                                "ema=false", "lr=0.02", "warmup_steps=0",  # weights that moved off adaLN-Zero's 0
                                "eval_samples=16", "sampler=heun", "sampling_steps=3", "eval_batch_size=8",
                                "guidance_scale=2.0", "guidance_interval=[0.0,0.7]",
                                f"digits_classifier={_classifier(tmp_path)}"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert (res["objective"], res["sampler"], res["sampling_steps"], res["eval_nfe"]) == ("flow", "heun", 3, 5)
    assert np.isfinite(res["fid"]) and 0 <= res["cls_acc"] <= 1
    meta = _meta(out / "model.safetensors")  # the weights the CLI falls back to without EMA
    assert (meta["objective"], meta["time_sampling"], meta["sampler"], meta["sampling_steps"]) == \
        ("flow", "logit_normal", "heun", "3")
    assert float(meta["guidance_scale"]) == 2.0 and json.loads(meta["guidance_interval"]) == [0.0, 0.7]
    # The CLI reads the path from the weights alone: same seed and batch size -> the training-time samples exactly.
    assert run_cli(sample_main, ["--checkpoint", str(out), "--num-samples", "16", "--batch-size", "8",
                                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "cli" / "sample_config.json").read_text())
    assert (cfg["objective"], cfg["sampler"], cfg["sampling_steps"], cfg["guidance_interval"]) == \
        ("flow", "heun", 3, [0.0, 0.7])
    with np.load(out / "samples" / "samples.npz") as a, np.load(tmp_path / "cli" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    # ... and a DDPM sampler on the same weights gives other images: the comparison above can fail.
    assert run_cli(sample_main, ["--checkpoint", str(out), "--num-samples", "16", "--batch-size", "8",
                                 "--out", str(tmp_path / "euler"), "--no-progress", "--sampler", "euler"]) == 0
    with np.load(out / "samples" / "samples.npz") as a, np.load(tmp_path / "euler" / "samples.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])


def _classifier(tmp_path: Path) -> Path:
    from hcvision.eval import save_digits_classifier

    kw = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    path = tmp_path / "clf.safetensors"
    save_digits_classifier(timm.create_model("vit_tiny_patch16_224", **kw).eval(), path, "vit_tiny_patch16_224", kw)
    return path


def test_repa_run_trains_the_projector_and_saves_the_dit_alone(tmp_path, encoder_file, capsys):
    enc_path, enc_state = encoder_file
    out = tmp_path / "repa"
    rc = train_dit.main(TINY + ENC_ARGS + [f"output_dir={out}", "max_steps=3", "eval_samples=0", "repa_weight=0.5",
                                           "repa_block=1", "repa_projector_dim=16", f"repa_encoder={enc_path}"])
    assert rc == 0, capsys.readouterr().err
    dit_keys = set(timm.create_model("dit_digits_2_shc2", embed_dim=32, depth=2, num_heads=2).state_dict())
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert set(load_file(str(out / name))) == dit_keys, name  # no projector, no encoder
    ckpt = load_file(str(next((out / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert {k for k in ckpt if k.startswith("projector.")} and {k[len("model."):] for k in ckpt
                                                               if k.startswith("model.")} == dit_keys
    # The encoder is nowhere in the run: no stored tensor has an encoder weight's name or value.
    stored = [t for f in out.rglob("*.safetensors") for t in load_file(str(f)).values()]
    big = [v for v in enc_state.values() if v.numel() > 100]
    assert not any(s.shape == v.shape and torch.equal(s, v) for s in stored for v in big)
    assert torch.equal(load_file(str(enc_path))["patch_embed.proj.weight"], enc_state["patch_embed.proj.weight"])
    res = json.loads((out / "results.json").read_text())
    assert (res["repa_weight"], res["repa_block"]) == (0.5, 1)
    assert res["params"] == sum(v.numel() for v in load_file(str(out / "model.safetensors")).values())
    # The logged loss includes -0.5 * cos similarity: it differs from the same run without REPA.
    plain = tmp_path / "plain"
    assert train_dit.main(TINY + [f"output_dir={plain}", "max_steps=3", "eval_samples=0"]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bad_objective_sampler_and_repa_inputs_exit_2_and_write_nothing(tmp_path, encoder_file, capsys):
    enc_path, _ = encoder_file

    def err(args):
        out = tmp_path / "never"
        assert train_dit.main(TINY + args + [f"output_dir={out}", "eval_samples=0"]) == 2
        assert not out.exists()
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0, msg
        return msg

    assert "does not sample a flow model; accepted: euler, heun, sde" in err(["objective=flow", "sampler=ddpm"])
    assert "does not sample a ddpm model; accepted: ddpm, ddim, dpmsolver++" in err(["sampler=sde"])
    assert "objective='sit'" in err(["objective=sit"])
    assert "'uniform' for objective=ddpm" in err(["time_sampling=logit_normal"])
    assert "guidance_interval=[0.8, 0.2]" in err(["guidance_interval=[0.8,0.2]"])
    assert "guidance_channels=2 is not valid; expected 1..1" in err(["guidance_channels=2"])  # 1x8x8 digits
    assert "global_batch_size=4096 is larger than the" in err(["global_batch_size=4096"])  # checked by the engine
    missing = tmp_path / "dinov2.safetensors"
    assert f"repa_encoder={str(missing)!r} does not exist" in err(["repa_weight=0.5", "repa_block=1",
                                                                           f"repa_encoder={missing}"])
    assert "repa_encoder is empty" in err(["repa_weight=0.5", "repa_block=1"])
    assert "repa_block=8" in err(ENC_ARGS + ["repa_weight=0.5", f"repa_encoder={enc_path}"])  # depth 2
    assert "repa_weight=-1" in err(["repa_weight=-1"])


def test_sit_and_repa_configs_parse_with_the_trainer():
    cfgs = {p.stem: parse_config(train_dit.DitConfig, ["--config", str(p)])
            for p in sorted((REPO / "configs" / "dit" / "flow").glob("*.yaml"))}
    assert len(cfgs) == 5
    for name, cfg in cfgs.items():
        assert (cfg.objective, cfg.sampler, cfg.sampling_steps) == ("flow", "sde", 250), name
    repa = cfgs["sit_xl_2_shc2_repa"]
    assert (repa.repa_weight, repa.repa_block, repa.guidance_interval, repa.guidance_scale, repa.diffusion_norm) == \
        (0.5, 8, (0.0, 0.7), 1.8, 2.0)
    assert parse_config(train_dit.DitConfig, ["objective=flow"]).sampling().sampler == "sde"
    assert parse_config(train_dit.DitConfig, []).sampling().sampler == "ddpm"


def test_old_config_keys_are_accepted_with_a_deprecation_warning(capsys):
    """eval_scheduler, eval_steps and cfg_scale (train_dit's names before the one sampling spec) still configure the
    run, and say which key replaces them."""
    cfg = parse_config(train_dit.DitConfig, ["objective=flow", "eval_scheduler=heun", "eval_steps=7", "cfg_scale=2.5"])
    assert (cfg.sampler, cfg.sampling_steps, cfg.guidance_scale) == ("heun", 7, 2.5)
    err = capsys.readouterr().err
    for old, new in (("eval_scheduler", "sampler"), ("eval_steps", "sampling_steps"), ("cfg_scale", "guidance_scale")):
        assert f"config key {old!r} is deprecated; use {new!r}" in err
