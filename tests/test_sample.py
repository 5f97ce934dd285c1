"""The sampling CLI (hcvision.sample): per-row generators through the one loop (hcvision.diffusion.sample),
per-sample determinism, identical files for 1 and 2 processes, class-balanced ADM .npz, EMA by default, the objective
read from the weights' metadata, latent decoding and bad input (exit 2, one line, nothing written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import hcvision.models.dit  # noqa: F401  (registers the DiT names)
from hcvision.cli import run_cli
from hcvision.diffusion import sample as diffusion_sample
from hcvision.diffusion import sampling_metadata
from hcvision.sample import class_labels, generate, main, make_grid, sample_seed
from hcvision.sampling_spec import SamplingSpec

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=2, num_heads=2)
NAME = "dit_digits_2_shc2"


def tiny_dit(name: str = NAME, seed: int = 0, **kwargs):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, **{**TINY, **kwargs})
    with torch.no_grad():  # adaLN-Zero starts at a zero output: perturb so samples depend on the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_run(d: Path, name: str = NAME, extra_meta: dict | None = None, **kwargs) -> Path:
    """A run directory as train_dit.py writes it: model.safetensors and model_ema.safetensors with metadata."""
    d.mkdir(parents=True, exist_ok=True)
    meta = {"model": name, "model_kwargs": json.dumps({**TINY, **kwargs}), **(extra_meta or {})}
    save_file(tiny_dit(name, 0, **kwargs).state_dict(), str(d / "model.safetensors"), metadata=meta)
    save_file(tiny_dit(name, 1, **kwargs).state_dict(), str(d / "model_ema.safetensors"), metadata=meta)
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("run") / "run")


@pytest.mark.parametrize("scheduler,cfg", [("ddpm", 2.0), ("dpmsolver++", 1.0), ("ddim", 1.5), ("sde", 2.0),
                                           ("heun", 1.5)])
def test_per_row_generators_equal_one_generator_per_call(scheduler, cfg):
    """Row i of a batch sampled with generators [g_0, g_1, g_2] is the batch-of-one chain sampled with g_i.

    The claim is exactness up to the rounding of another batch shape, so the model runs in float64 (its matmuls'
    batch-shape-dependent rounding, which differs between CPUs, is ~1e-16 there; in float32 it reached 1.9e-5 on an
    AMD EPYC). What remains is a possible one-ulp float32 flip when its output is cast back, carried through the
    steps: the tolerance is num_steps ulps of the samples' scale per guidance branch."""
    model = tiny_dit().double()
    denoiser = lambda x, t, y: model(x.double(), t, y).float()  # noqa: E731  (the sampler's arithmetic stays float32)
    y = torch.tensor([7, 2, 5])
    gen = lambda i: torch.Generator().manual_seed(sample_seed(3, i))  # noqa: E731
    steps = 6
    kw = dict(scheduler=scheduler, num_steps=steps, guidance_scale=cfg, null_class=model.null_class)
    batch = diffusion_sample(denoiser, (3, 1, 8, 8), y, generator=[gen(i) for i in range(3)], **kw)
    tol = steps * (1 + 2 * cfg) * torch.finfo(torch.float32).eps
    for i in range(3):
        alone = diffusion_sample(denoiser, (1, 1, 8, 8), y[i:i + 1], generator=gen(i), **kw)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=tol, atol=tol * float(batch.abs().max()))
    again = diffusion_sample(denoiser, (3, 1, 8, 8), y, generator=[gen(i) for i in range(3)], **kw)
    assert torch.equal(batch, again)


def test_sample_depends_only_on_its_index_not_on_the_batch():
    model = tiny_dit()
    common = dict(sample_shape=(1, 8, 8), num_classes=10, null_class=10, seed=5,
                  sampling=SamplingSpec(sampler="ddpm", sampling_steps=6, guidance_scale=1.5))
    full, labels = generate(model, list(range(7)), batch_size=4, **common)
    assert full.shape == (7, 8, 8, 1) and full.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    alone, _ = generate(model, [5], batch_size=4, **common)  # padded to 4 rows: same shape, same numbers
    np.testing.assert_array_equal(alone[0], full[5])
    other, _ = generate(model, [6, 2], batch_size=4, **common)
    np.testing.assert_array_equal(other, full[[6, 2]])
    smaller, _ = generate(model, list(range(7)), batch_size=3, **common)  # other shapes: equal up to rounding
    assert np.abs(smaller.astype(int) - full.astype(int)).max() <= 1
    reseeded, _ = generate(model, [5], batch_size=4, **{**common, "seed": 6})
    assert not np.array_equal(reseeded[0], full[5])
    assert len({sample_seed(0, i) for i in range(1000)}) == 1000


def test_grid_has_one_row_per_class():
    labels = class_labels(range(30), 10).numpy()
    images = (labels * 20).astype(np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2)
    grid = make_grid(images, labels, 10, per_row=3, min_cell=16)
    cell, gap = 16, 2
    assert grid.shape == (10 * (cell + gap) + gap, 3 * (cell + gap) + gap, 1)
    for k in range(10):
        top = gap + k * (cell + gap)
        for j in range(3):
            left = gap + j * (cell + gap)
            assert (grid[top: top + cell, left: left + cell] == k * 20).all()


def _read_npz(path: Path):
    with np.load(path) as d:
        return d["arr_0"], d["arr_1"]


def test_cli_writes_balanced_npz_pngs_grid_and_uses_ema_by_default(tmp_path, run_dir, capsys):
    args = ["--model", NAME, "--checkpoint", str(run_dir), "--num-samples", "12", "--sampling-steps", "5",
            "--batch-size", "5", "--no-progress"]
    assert run_cli(main, args + ["--out", str(tmp_path / "ema")]) == 0
    images, labels = _read_npz(tmp_path / "ema" / "samples.npz")
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)  # ADM: arr_0 uint8 NHWC
    assert labels.tolist() == [i % 10 for i in range(12)]
    pngs = sorted((tmp_path / "ema" / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(12)]
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[3]))[..., None], images[3])
    assert (tmp_path / "ema" / "grid.png").is_file()
    cfg = json.loads((tmp_path / "ema" / "sample_config.json").read_text())
    assert cfg["weights"].endswith("model_ema.safetensors") and cfg["guidance_scale"] == 1.5
    assert run_cli(main, args + ["--out", str(tmp_path / "raw"), "--raw"]) == 0
    raw, _ = _read_npz(tmp_path / "raw" / "samples.npz")
    assert not np.array_equal(raw, images)  # different weights, same seeds
    assert run_cli(main, args + ["--out", str(tmp_path / "ema2")]) == 0
    np.testing.assert_array_equal(_read_npz(tmp_path / "ema2" / "samples.npz")[0], images)  # reproducible


def test_latent_model_decodes_through_a_local_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(str(tmp_path / "vae"))
    run = save_run(tmp_path / "latent_run", "dit_s_2_res", input_size=4, num_classes=3)
    out = tmp_path / "out"
    rc = run_cli(main, ["--model", "dit_s_2_res", "--checkpoint", str(run), "--num-samples", "4",
                        "--sampling-steps", "3", "--out", str(out), "--vae", str(tmp_path / "vae"), "--no-progress"])
    assert rc == 0
    images, labels = _read_npz(out / "samples.npz")
    assert images.shape == (4, 8, 8, 3) and labels.tolist() == [0, 1, 2, 0]
    assert json.loads((out / "sample_config.json").read_text())["guidance_channels"] == 3  # DiT's default


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, run_dir, capsys):
    base = ["--num-samples", "2", "--sampling-steps", "2", "--no-progress"]

    def err(args, out=None):
        out = out or tmp_path / "never"
        before = sorted(out.rglob("*")) if out.is_dir() else None
        capsys.readouterr()
        assert run_cli(main, args + ["--out", str(out)] + base, prog="hcvision.sample") == 2
        msg = capsys.readouterr().err
        assert msg.startswith("hcvision.sample: error: ") and msg.count("\n") == 1, msg  # one line
        assert (sorted(out.rglob("*")) if out.is_dir() else None) == before  # nothing written
        return msg

    ok = ["--checkpoint", str(run_dir)]
    assert "does not exist" in err(["--checkpoint", str(tmp_path / "nope")])
    msg = err(["--model", "dit_digits_2_res", "--checkpoint", str(run_dir)])
    assert f"holds weights of '{NAME}'" in msg
    bare = tmp_path / "bare.safetensors"  # no recorded name: --model decides
    save_file(tiny_dit().state_dict(), str(bare))
    assert "not a registered DiT" in err(["--model", "dit_nope_2_shc2", "--checkpoint", str(bare)])
    assert "does not record its model name" in err(["--checkpoint", str(bare)])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((run_dir / "model.safetensors").read_bytes()[:5000])
    assert "truncated.safetensors" in err(["--checkpoint", str(truncated)])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "could not load" in err(["--checkpoint", str(garbage)])
    nan_run = tmp_path / "nan_run"
    nan_run.mkdir()
    sd = tiny_dit().state_dict()
    sd["final_layer.linear.weight"][0, 0] = float("nan")
    save_file(sd, str(nan_run / "model_ema.safetensors"),
              metadata={"model": NAME, "model_kwargs": json.dumps(TINY)})
    assert "NaN or Inf" in err(["--checkpoint", str(nan_run)])
    no_null = save_run(tmp_path / "no_null", class_dropout_prob=0.0)
    assert "label dropout" in err(["--checkpoint", str(no_null)])
    assert "--classes='3,10'" in err(ok + ["--classes", "3,10"])
    assert "--classes='a'" in err(ok + ["--classes", "a"])
    assert "--sampler='euler' does not sample a ddpm model" in err(ok + ["--sampler", "euler"])  # a flow sampler
    assert "--guidance-scale=nan" in err(ok + ["--guidance-scale", "nan"])
    assert "--diffusion-norm=-1.0" in err(ok + ["--diffusion-norm", "-1"])
    assert "--guidance-interval" in err(ok + ["--guidance-interval", "0.8", "0.2"])
    assert "--guidance-channels=2" in err(ok + ["--guidance-channels", "2"])
    bad_meta = save_run(tmp_path / "bad_meta", extra_meta={"objective": "score"})
    assert "metadata objective='score'" in err(["--checkpoint", str(bad_meta)])
    regular = tmp_path / "regular_file"
    regular.write_text("x")
    assert "is a regular file" in err(ok, out=regular / "sub" / "dir")
    assert "is a file, not a directory" in err(ok, out=regular)
    assert regular.read_text() == "x"
    latent = save_run(tmp_path / "latent", "dit_s_2_res", input_size=4, num_classes=3)
    msg = err(["--checkpoint", str(latent), "--vae", str(tmp_path / "missing_vae")])
    assert "does not exist" in msg and "--vae DIR" in msg
    assert "4-channel latents" in err(["--checkpoint", str(latent), "--vae", "none"])
    assert run_cli(main, ok + ["--out", str(tmp_path / "g"), "--num-samples", "0"]) == 2
    assert run_cli(main, ok + ["--out", str(tmp_path / "h")] + base) == 0
    assert "already holds samples.npz" in err(ok, out=tmp_path / "h")


def test_run_without_ema_falls_back_to_trained_weights(tmp_path, run_dir):
    only_raw = tmp_path / "only_raw"
    only_raw.mkdir()
    (only_raw / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    args = ["--checkpoint", str(only_raw), "--num-samples", "2", "--sampling-steps", "2", "--no-progress"]
    assert run_cli(main, args + ["--out", str(tmp_path / "o")]) == 0
    cfg = json.loads((tmp_path / "o" / "sample_config.json").read_text())
    assert cfg["weights"].endswith("model.safetensors") and cfg["model"] == NAME  # name read from the metadata


def test_flow_model_samples_with_its_recorded_sampler_and_guidance(tmp_path):
    """A file that records objective=flow is sampled with its recorded sampler, steps, scale and interval; the
    command line overrides them; the result is the one loop's output for those settings."""
    recorded = SamplingSpec(sampler="heun", sampling_steps=3, guidance_scale=2.0, guidance_interval=(0.0, 0.7))
    meta = sampling_metadata("flow", recorded)
    run = save_run(tmp_path / "flow_run", extra_meta=meta)
    args = ["--checkpoint", str(run), "--num-samples", "3", "--batch-size", "3", "--no-progress", "--seed", "4"]
    assert run_cli(main, args + ["--out", str(tmp_path / "rec")]) == 0
    cfg = json.loads((tmp_path / "rec" / "sample_config.json").read_text())
    assert (cfg["objective"], cfg["sampler"], cfg["sampling_steps"], cfg["guidance_scale"],
            cfg["guidance_interval"]) == ("flow", "heun", 3, 2.0, [0.0, 0.7])
    images, labels = _read_npz(tmp_path / "rec" / "samples.npz")
    model = tiny_dit(NAME, 1)  # the EMA weights
    ref, _ = generate(model, [0, 1, 2], sample_shape=(1, 8, 8), num_classes=10, null_class=10, sampling=recorded,
                      seed=4, batch_size=3)
    np.testing.assert_array_equal(images, ref)
    assert run_cli(main, args + ["--out", str(tmp_path / "sde"), "--sampler", "sde", "--sampling-steps", "4",
                                 "--diffusion-norm", "2",
                                 "--classes", "4,9"]) == 0
    cfg = json.loads((tmp_path / "sde" / "sample_config.json").read_text())
    assert (cfg["sampler"], cfg["sampling_steps"], cfg["diffusion_norm"], cfg["classes"]) == ("sde", 4, 2.0, [4, 9])
    sde, _ = generate(model, [0, 1, 2], sample_shape=(1, 8, 8), num_classes=10, null_class=10, classes=[4, 9],
                      sampling=SamplingSpec(sampler="sde", sampling_steps=4, guidance_scale=2.0,
                                            guidance_interval=(0.0, 0.7), diffusion_norm=2.0), seed=4, batch_size=3)
    np.testing.assert_array_equal(_read_npz(tmp_path / "sde" / "samples.npz")[0], sde)  # the norm reached the SDE
    assert _read_npz(tmp_path / "sde" / "samples.npz")[1].tolist() == [4, 9, 4]
    assert run_cli(main, args + ["--out", str(tmp_path / "x"), "--sampler", "ddpm"]) == 2  # not a flow sampler


@pytest.mark.slow
def test_one_and_two_processes_write_identical_files(tmp_path, run_dir):
    args = ["--model", NAME, "--checkpoint", str(run_dir), "--num-samples", "11", "--sampling-steps", "4",
            "--batch-size", "3", "--guidance-scale", "2.0", "--sampler", "ddpm", "--seed", "9", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "hcvision.sample", *args, "--out", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "hcvision.sample", *args, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"samples"') == 1  # one summary: really one rank 0, not two single processes
    a, b = _read_npz(tmp_path / "one" / "samples.npz"), _read_npz(tmp_path / "two" / "samples.npz")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    names = sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(11)]  # no gaps, no extras, no temp files
    for n in names:
        assert (tmp_path / "one" / "images" / n).read_bytes() == (tmp_path / "two" / "images" / n).read_bytes()
    assert len({a[0][i].tobytes() for i in range(11)}) == 11  # distinct samples


def test_old_option_names_still_work_and_say_they_are_deprecated(tmp_path, run_dir, capsys):
    """--scheduler, --steps and --cfg-scale (the names before the one sampling spec) mean --sampler,
    --sampling-steps and --guidance-scale, with a warning naming the new option."""
    common = ["--checkpoint", str(run_dir), "--num-samples", "3", "--batch-size", "3", "--no-progress"]
    assert run_cli(main, common + ["--out", str(tmp_path / "new"), "--sampler", "ddim", "--sampling-steps", "3",
                                   "--guidance-scale", "2.0"]) == 0
    capsys.readouterr()
    assert run_cli(main, common + ["--out", str(tmp_path / "old"), "--scheduler", "ddim", "--steps", "3",
                                   "--cfg-scale", "2.0"]) == 0
    err = capsys.readouterr().err
    renames = (("--scheduler", "--sampler"), ("--steps", "--sampling-steps"), ("--cfg-scale", "--guidance-scale"))
    for old, new in renames:
        assert f"warning: {old} is deprecated; use {new}" in err
    np.testing.assert_array_equal(_read_npz(tmp_path / "old" / "samples.npz")[0],
                                  _read_npz(tmp_path / "new" / "samples.npz")[0])


def test_grid_is_sized_to_the_samples():
    """Fewer samples than a full grid: as many columns as the fullest class, rows only for classes with samples."""
    labels = class_labels(range(20), 10).numpy()  # 2 per class
    images = np.full((20, 8, 8, 1), 7, dtype=np.uint8)
    grid = make_grid(images, labels, 10, per_row=10, min_cell=16)
    assert grid.shape == (10 * 18 + 2, 2 * 18 + 2, 1)
    assert (grid[2:18, 2:18] == 7).all() and (grid[2:18, 20:36] == 7).all()
    few = make_grid(images[:4], class_labels(range(4), 1000).numpy(), 1000, min_cell=16)  # 4 of 1000 classes
    assert few.shape == (4 * 18 + 2, 1 * 18 + 2, 1)
