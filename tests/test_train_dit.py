"""End-to-end tests of train_dit.py: train + sample + score, exact resume, latent directories, configs, bad input,
the all-reduced loss and a 2-process run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hcvision import train_dit
from hcvision.engine import parse_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model_kwargs.embed_dim=32", "model_kwargs.depth=2", "model_kwargs.num_heads=2", "progress_bar=false",
        "tensorboard=false", "global_batch_size=32", "log_every=1"]
TINY_VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)



@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: avoid OpenMP oversubscription
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small random digits classifier in the hcv-digits format (the demo uses a trained one)."""
    import timm

    from hcvision.eval import save_digits_classifier

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_digits_classifier(model, path, "vit_tiny_patch16_224", TINY_VIT)
    return model, path


def _tensors(path: Path):
    return load_file(str(path))


def test_train_sample_and_score_end_to_end(tmp_path, classifier, capsys):
    clf_model, clf_path = classifier
    out = tmp_path / "run"
    rc = train_dit.main(TINY + [f"output_dir={out}", "max_steps=4", "eval_samples=20", "sampling_steps=3",
                                "eval_batch_size=8", f"digits_classifier={clf_path}", "guidance_scale=2.0",
                                "eval_unguided=true"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    for key in ("fid", "precision", "recall"):
        assert np.isfinite(res[key]), key
    assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0 and res["fid"] > 0
    assert res["global_step"] == 4 and res["weights"] == "ema" and res["num_processes"] == 1
    with np.load(out / "samples" / "samples.npz") as d:
        images, labels = d["arr_0"], d["arr_1"]
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(20)]
    # cls_acc is the classifier's agreement with the requested classes of the *saved* samples: recompute it.
    from hcvision.eval import cls_acc

    assert res["cls_acc"] == pytest.approx(cls_acc(images, [i % 10 for i in range(20)], weights_path=clf_path))
    grid = np.asarray(Image.open(out / "samples" / "grid.png"))
    assert grid.shape[0] == 10 * (32 + 2) + 2  # one row per class (8x8 digits enlarged to 32 px)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "train/lr" in line] == [1, 2, 3, 4]
    # FID without guidance beside the guided one: the same seeds sampled at guidance scale 1
    with np.load(out / "samples_unguided" / "samples.npz") as d:
        unguided = d["arr_0"]
    from hcvision.sample import generate, load_dit
    from hcvision.sampling_spec import SamplingSpec

    ema, _ = load_dit(out)
    expected, _ = generate(ema, range(20), sample_shape=(1, 8, 8), num_classes=10, null_class=ema.null_class,
                           sampling=SamplingSpec(sampler="ddpm", sampling_steps=3, guidance_scale=1.0), batch_size=8)
    np.testing.assert_array_equal(unguided, expected)
    # numeric results reach the trackers as final/<key>, as final/fid does
    assert np.isfinite(res["fid_unguided"]) and 0 <= res["cls_acc_unguided"] <= 1
    with safe_open(str(out / "model_ema.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "dit_digits_2_shc2" and json.loads(meta["model_kwargs"])["class_dropout_prob"] == 0.1
    a, b = _tensors(out / "model.safetensors"), _tensors(out / "model_ema.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the EMA is a separate, averaged copy


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    # Label dropout, t and the noise all draw randomness; EMA and grad accumulation carry state across steps.
    common = TINY + ["eval_samples=0", "grad_accum_steps=2", "ema_decay=0.9", "warmup_steps=3",
                     "lr_schedule=cosine", "epochs=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_dit.main(common + [f"output_dir={full}", "max_steps=9"]) == 0
    assert train_dit.main(common + [f"output_dir={split}", "max_steps=5"]) == 0
    state = json.loads((split / "checkpoints" / "step_00000005" / "train_state.json").read_text())
    assert 0 < state["step_in_epoch"]  # stopped inside an epoch
    assert train_dit.main(common + [f"output_dir={split}", "max_steps=9", "resume=auto"]) == 0
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _tensors(full / name), _tensors(split / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    mid = _tensors(split / "checkpoints" / "step_00000005" / "model.safetensors")
    assert any(not torch.equal(mid[k], a[k]) for k in a)


class _FakeAccelerator:
    num_processes = 2

    def reduce(self, tensor, reduction):
        assert reduction == "mean"
        return torch.tensor(123.0)


def test_logged_loss_is_the_all_reduced_value_with_the_local_gradient():
    import timm

    import hcvision.models.dit  # noqa: F401

    model = timm.create_model("dit_digits_2_res", embed_dim=32, depth=1, num_heads=2)
    batch = (torch.randn(4, 1, 8, 8), torch.arange(4))
    torch.manual_seed(0)
    local, n = train_dit.DiffusionLoss(type("A", (), {"num_processes": 1})())(model, batch)
    local.backward()
    g_local = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    torch.manual_seed(0)
    reduced, _ = train_dit.DiffusionLoss(_FakeAccelerator())(model, batch)
    assert n == 4 and reduced.item() == pytest.approx(123.0) and local.item() != pytest.approx(123.0)
    reduced.backward()
    g_reduced = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(g_local, g_reduced):
        torch.testing.assert_close(a, b)


def _image_folder(root: Path, n: int = 6, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _tiny_vae_dir(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    from hcvision.data.latents import ExtractionSettings, extract_latents

    base = tmp_path_factory.mktemp("lat")
    vae = _tiny_vae_dir(base / "vae")
    extract_latents(_image_folder(base / "images"), base / "latents", ExtractionSettings(vae=str(vae), image_size=16),
                    progress=False)
    return base / "latents", vae


def test_latent_directory_training_decodes_samples_with_the_recorded_vae(tmp_path, latent_dir):
    latents, _ = latent_dir
    out = tmp_path / "run"
    rc = train_dit.main(["model=dit_s_2_shc2", "model_kwargs.input_size=8", "model_kwargs.embed_dim=32",
                         "model_kwargs.depth=1", "model_kwargs.num_heads=2", f"data_dir={latents}", f"output_dir={out}",
                         "global_batch_size=2", "max_steps=3", "eval_samples=4", "eval_steps=2", "progress_bar=false",
                         "tensorboard=false"])
    assert rc == 0
    with np.load(out / "samples" / "samples.npz") as d:
        assert d["arr_0"].shape == (4, 16, 16, 3) and d["arr_1"].tolist() == [0, 1, 0, 1]  # decoded RGB, 2 classes
    res = json.loads((out / "results.json").read_text())
    assert "fid" not in res and res["data"] == str(latents)  # no eval_ref: samples only


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, latent_dir, classifier, capsys):
    latents, _ = latent_dir
    clf = f"digits_classifier={classifier[1]}"

    def err(args):
        out = tmp_path / "never"
        assert train_dit.main(args + [f"output_dir={out}"]) == 2
        assert not out.exists()
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0, msg
        return msg

    msg = err(["model=dit_s_2_shc2", f"data_dir={latents}", "eval_samples=0"])
    assert "shape (4, 8, 8)" in msg and "takes (4, 32, 32)" in msg and "model_kwargs.input_size=8" in msg
    msg = err(["model_kwargs.num_classes=5", clf])
    assert "num_classes=5" in msg and "10 classes" in msg
    assert "not a latent directory" in err([f"data_dir={tmp_path}", "eval_samples=0"])
    assert "not a registered DiT" in err(["model=dit_digits_3_shc2", clf])
    msg = err([f"digits_classifier={tmp_path / 'missing.safetensors'}"])
    assert "does not exist" in msg and "hcv-train-cls" in msg and "eval_samples=0" in msg
    assert "label dropout" in err(["class_dropout_prob=0", "guidance_scale=1.5", clf])
    assert "did you mean 'sampling_steps'" in err(["sampling_step=10", clf])
    assert "sampler='euler' does not sample a ddpm model" in err(["sampler=euler", clf])
    # A latent run whose VAE is gone (offline machine): say how to supply one before training.
    moved = tmp_path / "lat_copy"
    shutil.copytree(latents, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["vae"] = str(tmp_path / "gone_vae")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    msg = err(["model=dit_s_2_shc2", "model_kwargs.input_size=8", f"data_dir={moved}"])
    assert "does not exist" in msg and "huggingface-cli download" in msg and "vae=DIR" in msg


def test_paper_configs_parse_and_build():
    import timm

    import hcvision.models.dit  # noqa: F401

    cfgs = {p.stem: parse_config(train_dit.DitConfig, ["--config", str(p)])
            for p in sorted((REPO / "configs" / "dit").glob("*.yaml"))}
    assert {"dit_xl_2_res", "dit_xl_2_shc2", "dit_s_2_shc2", "dit_b_2_shc2"} <= set(cfgs)
    for name, cfg in cfgs.items():
        if name.startswith("dit_digits"):
            continue
        assert (cfg.global_batch_size, cfg.lr, cfg.weight_decay, cfg.ema_decay) == (256, 1e-4, 0.0, 0.9999), name
        assert cfg.mixed_precision == "fp16" and cfg.model_kwargs["qk_norm"] is True and cfg.class_dropout_prob == 0.1
    assert cfgs["dit_digits_shc2"] == parse_config(train_dit.DitConfig, [])  # the YAML is the demo
    assert cfgs["dit_xl_2_shc2"].epochs == 1400 and cfgs["dit_xl_2_shc2"].max_steps == 0
    assert cfgs["dit_xl_2_res"].max_steps == 400_000
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in timm.create_model(cfgs[n].model, **cfgs[n].model_kwargs).parameters())
                  for n in ("dit_xl_2_res", "dit_xl_2_shc2")}
    assert counts["dit_xl_2_res"] == pytest.approx(675e6, rel=0.01)  # DiT-XL/2: 675M (HC paper Table 10)
    assert 0 < counts["dit_xl_2_shc2"] - counts["dit_xl_2_res"] < 1e-4 * counts["dit_xl_2_res"]


@pytest.mark.slow
def test_two_process_training_with_torchrun(tmp_path, classifier):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_dit.py"), *TINY, f"output_dir={out}", "max_steps=3", "eval_samples=10", "eval_steps=2",
           f"digits_classifier={classifier[1]}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2 and res["global_step"] == 3 and np.isfinite(res["fid"])
    with np.load(out / "samples" / "samples.npz") as d:
        assert d["arr_1"].tolist() == [i % 10 for i in range(10)]
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/lr" in json.loads(line)]
    assert len(losses) == 3 and all(np.isfinite(losses))
