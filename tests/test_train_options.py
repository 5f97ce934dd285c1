"""Trainer options every run takes from the engine: ``grad_checkpointing`` and ``compile`` change how a step is
computed, never what it computes (checked against the plain run), and keep weight and checkpoint names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcvision import train_cls, train_dit

pytestmark = pytest.mark.usefixtures("one_thread")

CLS = ["model=vit_digits_patch2_8_dhc2", "model_kwargs.embed_dim=32", "model_kwargs.depth=2", "progress_bar=false",
       "tensorboard=false", "diagnostics=false", "max_steps=4", "checkpoint_every=2", "warmup_steps=1"]
DIT = ["model_kwargs.embed_dim=32", "model_kwargs.depth=2", "model_kwargs.num_heads=2", "progress_bar=false",
       "tensorboard=false", "global_batch_size=32", "max_steps=3", "eval_samples=0", "diagnostics=false"]


def _weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_file(str(run / name))


def _assert_same(a: dict, b: dict, **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)


def test_grad_checkpointing_gives_the_plain_runs_weights(tmp_path):
    assert train_cls.main(CLS + [f"output_dir={tmp_path / 'plain'}"]) == 0
    assert train_cls.main(CLS + [f"output_dir={tmp_path / 'ckpt'}", "grad_checkpointing=true"]) == 0
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "ckpt"), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_grad_checkpointing_with_repa_projects_once_and_matches(tmp_path):
    """A recomputed block must not re-project the tokens (REPA's hook acts only inside the wrapper's forward)."""
    import timm
    from safetensors.torch import save_file

    enc = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, embed_dim=24, depth=1, num_heads=2)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    repa = ["repa_weight=0.5", "repa_block=1", "repa_projector_dim=16", f"repa_encoder={path}",
            "repa_encoder_model=vit_small_patch14_dinov2", "repa_encoder_kwargs.embed_dim=24",
            "repa_encoder_kwargs.depth=1", "repa_encoder_kwargs.num_heads=2"]
    assert train_dit.main(DIT + repa + [f"output_dir={tmp_path / 'plain'}"]) == 0
    assert train_dit.main(DIT + repa + [f"output_dir={tmp_path / 'ckpt'}", "grad_checkpointing=true"]) == 0
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "ckpt"), rtol=1e-6, atol=1e-7)
    plain_ckpt = next((tmp_path / "plain" / "checkpoints").glob("step_*"))
    ckpt_ckpt = next((tmp_path / "ckpt" / "checkpoints").glob("step_*"))
    _assert_same(_weights(plain_ckpt), _weights(ckpt_ckpt), rtol=1e-6, atol=1e-7)  # the projector too


@pytest.mark.slow
def test_compile_trains_like_eager_keeps_names_and_resumes(tmp_path):
    """torch.compile (Inductor, CPU here) in place: the same updates as eager up to float reassociation, the same
    tensor names in weights and checkpoints, and a compiled run resumes from its checkpoint."""
    torch._dynamo.reset()  # compile here, not reuse what an earlier test in this process compiled
    assert train_cls.main(CLS + [f"output_dir={tmp_path / 'eager'}"]) == 0
    assert train_cls.main(CLS + [f"output_dir={tmp_path / 'compiled'}", "compile=true"]) == 0
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    _assert_same(eager, compiled, rtol=1e-3, atol=1e-4)
    ckpts = sorted((tmp_path / "compiled" / "checkpoints").glob("step_*"))
    assert ckpts and set(_weights(ckpts[-1])) == set(eager)  # no "_orig_mod." anywhere
    assert train_cls.main(CLS + [f"output_dir={tmp_path / 'compiled'}", "compile=true", "max_steps=6",
                                 "resume=auto"]) == 0
    res = json.loads((tmp_path / "compiled" / "results.json").read_text())
    assert res["global_step"] == 6


def test_grad_checkpointing_on_a_model_without_the_api_is_a_usage_error(tmp_path):
    from hcvision.engine import BaseTrainConfig, ConfigError, Run

    cfg = BaseTrainConfig(model="linear", output_dir=str(tmp_path / "run"), global_batch_size=2, tensorboard=False,
                          grad_checkpointing=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    with Run(cfg, "train_x") as run:
        with pytest.raises(ConfigError, match=r"grad_checkpointing=true: model='linear' has no set_grad_checkpointing"):
            run.trainer(torch.nn.Linear(2, 2), loader, lambda m, b: (m(b[0]).sum(), 2))
    assert not (tmp_path / "run").exists()


def _lr_scales(opt, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("wrap", [False, True])
def test_layer_decay_on_a_dit_and_under_repa(wrap):
    """DiT: the embedders at d^(L+1), block i at d^(L-i), the final layer (the head) at 1; under REPA the DiT's
    parameters get the same LRs and the projector the head's."""
    import timm

    from hcvision.diffusion.repa import REPA
    from hcvision.engine import BaseTrainConfig, build_optimizer

    d, depth, lr = 0.5, 3, 1e-3
    dit = timm.create_model("dit_digits_2_shc2", embed_dim=32, depth=depth, num_heads=2)
    enc = timm.create_model("vit_small_patch14_dinov2", img_size=8, patch_size=2, embed_dim=24, depth=1, num_heads=2,
                            num_classes=0)
    model = REPA(dit, enc, block=1, projector_dim=16) if wrap else dit
    cfg = BaseTrainConfig(model="dit", lr=lr, weight_decay=0.0, layer_decay=d)
    got = _lr_scales(build_optimizer(model, cfg), model)
    assert len(got) == sum(1 for _ in model.parameters())
    for name, value in got.items():
        inner = name[len("model."):] if wrap and name.startswith("model.") else name
        if inner.endswith(("embedder.weight", "embedder.bias")) or "_embedder." in inner:
            scale = d ** (depth + 1)
        elif inner.startswith("blocks."):
            scale = d ** (depth - int(inner.split(".")[1]))
        else:  # final_layer, and REPA's projector
            scale = 1.0
        assert value == pytest.approx(lr * scale), name


def test_resume_with_another_layer_decay_is_refused_before_any_write(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cls.main(CLS + [f"output_dir={out}", "max_steps=2", "layer_decay=0.75"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train_cls.main(CLS + [f"output_dir={out}", "resume=auto", "layer_decay=0.7"]) == 2
    err = capsys.readouterr().err
    assert "records layer_decay=0.75, not layer_decay=0.7" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_options_reach_the_trained_model(tmp_path):
    """What the weight comparisons above cannot show: the flags were applied (a no-op option would pass them)."""
    import timm

    import hcvision  # noqa: F401
    from hcvision.engine import BaseTrainConfig, Run

    model = timm.create_model("vit_digits_patch2_8_dhc2", embed_dim=32, depth=1)
    cfg = BaseTrainConfig(model="vit_digits_patch2_8_dhc2", output_dir=str(tmp_path / "run"), global_batch_size=2,
                          tensorboard=False, grad_checkpointing=True, compile=True, ema=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8)), batch_size=2)
    with Run(cfg, "train_x") as run:
        run.trainer(model, loader, lambda m, b: (m(b[0]).sum(), 2))
        assert model.grad_checkpointing and getattr(model, "_compiled_call_impl", None) is not None
        assert getattr(run.ema.module, "_compiled_call_impl", None) is None  # the EMA copy stays eager
