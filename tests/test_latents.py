"""Latent extraction (hcvision.data.latents) with a tiny random AutoencoderKL: moments, posterior sampling, flips,
pixel mode, multi-process sharding (no gaps, no duplicates, no overwrites) and offline VAE errors."""
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

from hcvision.data.latents import (
    ExtractionSettings,
    LatentDataset,
    VaeUnavailableError,
    center_crop_arr,
    extract_latents,
    load_vae,
    read_manifest,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
NUM_IMAGES = 10


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=SIZE).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """10 random RGB images of different sizes/aspect ratios in 2 classes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(20, 24), (40, 30), (16, 16), (33, 50), (64, 17), (18, 40), (25, 25), (70, 35), (17, 19), (48, 32)]
    for i, (w, h) in enumerate(sizes):
        cls = root / ("cat" if i % 2 else "dog")
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cls / f"img{i:02d}.png")
    return root


def folder_samples(root: Path):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root)).samples


def reference_moments(vae, path: str, flip: bool) -> torch.Tensor:
    """Independent encoding of one image: crop, optional flip of the pixels, [-1, 1], posterior parameters."""
    arr = center_crop_arr(Image.open(path).convert("RGB"), SIZE)
    if flip:
        arr = arr[:, ::-1]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1)[0]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, image_folder, vae_dir):
    out = tmp_path_factory.mktemp("latents") / "out"
    settings = ExtractionSettings(vae=str(vae_dir), image_size=SIZE, shard_size=4)
    manifest = extract_latents(image_folder, out, settings, batch_size=3, progress=False)
    return out, manifest


def test_center_crop_exact_on_short_side_and_shape():
    rng = np.random.default_rng(1)
    tall = rng.integers(0, 256, (24, SIZE, 3), dtype=np.uint8)  # short side == SIZE: a pure centre slice
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(tall), SIZE), tall[4:20])
    big = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    assert center_crop_arr(big, SIZE).shape == (SIZE, SIZE, 3)
    flat = Image.fromarray(np.full((50, 80, 3), 77, dtype=np.uint8))  # resampling keeps a constant image constant
    assert (center_crop_arr(flat, SIZE) == 77).all()


def test_moments_match_independent_encoding_for_both_views(extracted, image_folder, vae_dir):
    from safetensors.torch import load_file

    out, manifest = extracted
    assert manifest["num_samples"] == NUM_IMAGES and manifest["views"] == 2 and manifest["mode"] == "vae"
    assert manifest["sample_shape"] == [4, SIZE // 2, SIZE // 2]
    assert manifest["classes"] == ["cat", "dog"]
    vae = load_vae(str(vae_dir))
    samples = folder_samples(image_folder)
    for shard in manifest["shards"]:
        t = load_file(str(out / shard["file"]))
        assert t["moments"].shape == (shard["stop"] - shard["start"], 2, 8, SIZE // 2, SIZE // 2)
        for row, index in enumerate(t["index"].tolist()):
            path, label = samples[index]
            assert int(t["label"][row]) == label
            for view, flip in ((0, False), (1, True)):
                torch.testing.assert_close(t["moments"][row, view], reference_moments(vae, path, flip),
                                           rtol=1e-4, atol=1e-5)
    # The flipped view is a different posterior, not the flipped latent (why both are stored).
    t0 = load_file(str(out / manifest["shards"][0]["file"]))["moments"][0]
    assert not torch.allclose(t0[1], t0[0].flip(-1), atol=1e-3)


def test_posterior_draws_are_fresh_gaussians_with_the_stored_moments(extracted):
    out, manifest = extracted
    ds = LatentDataset(out, seed=3, hflip=False)
    from safetensors.torch import load_file

    moments = load_file(str(out / manifest["shards"][1]["file"]))["moments"][1, 0]  # index 5, unflipped view
    mean, logvar = moments.chunk(2)
    scale = manifest["scale_factor"]
    assert scale == pytest.approx(0.18215)
    draws = []
    for epoch in range(1500):
        ds.set_epoch(epoch)
        z, label = ds[5]
        draws.append(z)
    z = torch.stack(draws)
    resid = (z / scale - mean) / torch.exp(0.5 * logvar)  # must be standard normal
    assert abs(float(resid.mean())) < 0.02 and abs(float(resid.std()) - 1.0) < 0.02
    assert not torch.equal(draws[0], draws[1])  # fresh noise every epoch
    ds.set_epoch(7)
    torch.testing.assert_close(ds[5][0], draws[7], rtol=0, atol=0)  # a pure function of (seed, epoch, index)
    exact = LatentDataset(out, hflip=False, sample_posterior=False)
    torch.testing.assert_close(exact[5][0], scale * mean)


def test_training_flip_picks_either_stored_view(extracted):
    out, manifest = extracted
    from safetensors.torch import load_file

    views = load_file(str(out / manifest["shards"][0]["file"]))["moments"][2]
    ds = LatentDataset(out, hflip=True, sample_posterior=False)
    seen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        z = ds[2][0] / manifest["scale_factor"]
        match = [v for v in (0, 1) if torch.allclose(z, views[v].chunk(2)[0], atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {0, 1}


def test_pixel_mode_stores_uint8_and_flips_exactly(tmp_path, image_folder):
    out = tmp_path / "pix"
    manifest = extract_latents(image_folder, out, ExtractionSettings(vae="none", image_size=SIZE, shard_size=3,
                                                                     channels="L"), progress=False)
    assert manifest["mode"] == "pixels" and manifest["sample_shape"] == [1, SIZE, SIZE]
    samples = folder_samples(image_folder)
    ref = center_crop_arr(Image.open(samples[4][0]).convert("L"), SIZE)[..., 0]
    expect = torch.from_numpy(ref).float() / 127.5 - 1.0
    ds = LatentDataset(out, hflip=True)
    got = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        x, y = ds[4]
        assert y == samples[4][1] and x.shape == (1, SIZE, SIZE)
        if torch.equal(x[0], expect):
            got.add("plain")
        elif torch.equal(x[0], expect.flip(-1)):
            got.add("flip")
        else:
            raise AssertionError("pixel sample is neither the image nor its mirror")
    assert got == {"plain", "flip"}


def test_bad_inputs_are_named(tmp_path, extracted, image_folder):
    out, _ = extracted
    with pytest.raises(ValueError, match="already holds a complete extraction"):
        extract_latents(image_folder, out, ExtractionSettings(vae="none", image_size=SIZE), progress=False)
    with pytest.raises(ValueError, match="image_size=0"):
        extract_latents(image_folder, tmp_path / "x", ExtractionSettings(vae="none", image_size=0), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        extract_latents(tmp_path / "missing", tmp_path / "y", ExtractionSettings(vae="none"), progress=False)
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="noimages.*not an ImageFolder"):
        extract_latents(tmp_path / "noimages", tmp_path / "z", ExtractionSettings(vae="none"), progress=False)
    (tmp_path / "partial" / "shards").mkdir(parents=True)
    with pytest.raises(ValueError, match="not finished"):
        read_manifest(tmp_path / "partial")


def test_missing_vae_offline_says_how_to_supply_one(tmp_path, monkeypatch, image_folder, runner):
    with pytest.raises(VaeUnavailableError, match=r"does not exist.*huggingface-cli download.*--vae DIR"):
        load_vae(str(tmp_path / "no_such_vae"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaeUnavailableError, match="no config.json"):
        load_vae(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VaeUnavailableError, match=r"HF_HUB_OFFLINE.*pass its path"):
        load_vae("hcvision-test/not-a-cached-vae")
    # The command line (`python -m hcvision.data.latents`, run by the conftest runner) turns it into exit code 2
    # with the same message.
    r = runner.run("hcvision.data.latents", ["--data-dir", str(image_folder), "--out", str(tmp_path / "o"), "--vae",
                                             str(tmp_path / "no_such_vae")], cwd=str(REPO),
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "huggingface-cli download" in r.stderr


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_without_gaps_and_resume(tmp_path, image_folder, vae_dir, extracted,
                                                                     runner):
    """torchrun with 2 gloo processes: same content as one process, every index once, finished shards kept."""
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hcvision.data.latents", "--data-dir", str(image_folder), "--out", str(out), "--vae", str(vae_dir),
           "--image-size", str(SIZE), "--shard-size", "3", "--batch-size", "2", "--num-workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_manifest(out)
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == ["000000000-000000003.safetensors", "000000003-000000006.safetensors",
                     "000000006-000000009.safetensors", "000000009-000000010.safetensors"]  # no tmp leftovers
    ref = LatentDataset(extracted[0], sample_posterior=False, hflip=False)
    dist = LatentDataset(out, sample_posterior=False, hflip=False)
    assert len(dist) == NUM_IMAGES and manifest["num_samples"] == NUM_IMAGES
    for i in range(NUM_IMAGES):
        torch.testing.assert_close(dist[i][0], ref[i][0], rtol=1e-4, atol=1e-5)
        assert dist[i][1] == ref[i][1]
    # Resume: drop one shard and the manifest; a rerun rewrites only the missing shard.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (out / "shards" / names[1]).unlink()
    (out / "manifest.json").unlink()
    # one process (`python -m hcvision.data.latents`, run by the conftest runner: no second interpreter start-up)
    r = runner.run("hcvision.data.latents", cmd[cmd.index("--data-dir"):], cwd=str(REPO), env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert {k for k in after if after[k] != stamps.get(k)} == {names[1]}
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_hfds_source_extracts_what_the_folder_gives(tmp_path, image_folder, monkeypatch):
    """The same images as a local Hugging Face dataset (the Hub's parquet layout, read through timm's hfds reader):
    pixel-mode extraction stores the same crops, labels and classes as from the ImageFolder."""
    import datasets
    from torchvision.datasets import ImageFolder

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = ImageFolder(str(image_folder))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in folder.samples],
            "label": [y for _, y in folder.samples]}
    (tmp_path / "hf" / "data").mkdir(parents=True)
    parquet = tmp_path / "hf/data/train-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    settings = ExtractionSettings(vae="none", image_size=SIZE, shard_size=4)
    a = extract_latents(image_folder, tmp_path / "from_folder", settings, progress=False)
    b = extract_latents(f"hfds/{tmp_path / 'hf'}", tmp_path / "from_hfds", settings, split="train",
                        data_root=str(tmp_path / "cache"), progress=False)
    assert a["classes"] == b["classes"] == folder.classes and a["num_samples"] == b["num_samples"] == NUM_IMAGES
    da, db = LatentDataset(tmp_path / "from_folder", hflip=False), LatentDataset(tmp_path / "from_hfds", hflip=False)
    for i in range(NUM_IMAGES):
        (xa, ya), (xb, yb) = da[i], db[i]
        assert ya == yb == folder.samples[i][1] and torch.equal(xa, xb)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="WebDataset shards have no random access"):
        extract_latents(f"wds/{tmp_path / 'shards'}", tmp_path / "w", settings, progress=False)
