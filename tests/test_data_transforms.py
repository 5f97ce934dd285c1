"""The data transforms the user controls (timm train.py's keys), in_chans=1 on RGB data, and the digits exported as
an ImageFolder (``python -m hcvision.data.digits --export DIR``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from hcvision import train_cls
from hcvision.cli import run_cli
from hcvision.data import DigitsDataset, classification_datasets, digits_split_indices
from hcvision.data.sources import parse_data
from hcvision.engine import parse_config
from hcvision.models.loading import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")

QUIET = ["progress_bar=false", "tensorboard=false"]
# A 3-channel (ImageNet cfg) HC ViT shrunk to 8x8 inputs: the in_chans=1 case at test size.
TINY_RGB_MODEL = ["model=vit_tiny_patch16_224_dhc2", "model_kwargs.img_size=8", "model_kwargs.patch_size=2",
                  "model_kwargs.embed_dim=32", "model_kwargs.depth=1", "model_kwargs.num_heads=2"]


def _rgb_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = (rng.random((12, 12, 3)) * 100 + 100 * c).astype(np.uint8)
                Image.fromarray(arr, "RGB").save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from hcvision.data.digits import export_image_folder

    root = tmp_path_factory.mktemp("digits") / "png"
    assert export_image_folder(root) == {"train": 1437, "val": 360}
    return root


def _of_type(transform, kind):
    return [t for t in transform.transforms if isinstance(t, kind)]


def _datasets(argv):
    from hcvision.data.transforms import TransformOptions

    cfg = parse_config(train_cls.ClsConfig, argv)
    model = create_model(cfg.model, cfg.model_kwargs, meta=True)
    return classification_datasets(parse_data(cfg.data_dir), model, transform=TransformOptions.from_config(cfg))


# -- the keys reach timm's transform ------------------------------------------------------------------------------
def test_transform_keys_reach_timm_create_transform(tmp_path):
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    data = _rgb_folder(tmp_path / "rgb")
    train, val, _, _ = _datasets(TINY_RGB_MODEL + [
        f"data_dir={data}", "scale=0.5,0.9", "ratio=0.8,1.25", "hflip=0.25", "vflip=0.75", "color_jitter=0.2",
        "auto_augment=rand-m9-mstd0.5", "reprob=0.3", "remode=rand", "recount=2", "interpolation=bicubic",
        "crop_pct=0.5", "mean=0.1,0.2,0.3", "std=0.4,0.5,0.6"])
    t = train.dataset.transform
    (rrc,) = _of_type(t, RandomResizedCropAndInterpolation)
    assert (rrc.size, rrc.scale, rrc.ratio) == ((8, 8), (0.5, 0.9), (0.8, 1.25))
    assert rrc.interpolation == T.InterpolationMode.BICUBIC
    assert _of_type(t, T.RandomHorizontalFlip)[0].p == 0.25 and _of_type(t, T.RandomVerticalFlip)[0].p == 0.75
    assert "RandAugment" in repr(t)  # timm turns colour jitter off under RandAugment, as its train.py does
    (erase,) = _of_type(t, RandomErasing)
    assert (erase.probability, erase.mode, erase.max_count) == (0.3, "rand", 2)
    (norm,) = _of_type(t, T.Normalize)
    assert torch.allclose(norm.mean, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(norm.std, torch.tensor([0.4, 0.5, 0.6]))
    # evaluation: crop_pct and interpolation, no augmentation
    v = val.transform
    (resize,) = _of_type(v, T.Resize)
    assert resize.size == 16 and resize.interpolation == T.InterpolationMode.BICUBIC  # 8 / crop_pct 0.5
    assert not _of_type(v, T.RandomHorizontalFlip) and not _of_type(v, RandomErasing)
    # colour jitter without auto-augment, and 'random' interpolation: per training image, the model's in eval
    train, val, _, _ = _datasets(TINY_RGB_MODEL + [f"data_dir={data}", "color_jitter=0.2", "interpolation=random"])
    (jitter,) = _of_type(train.dataset.transform, T.ColorJitter)
    assert jitter.brightness == (0.8, 1.2) and jitter.contrast == (0.8, 1.2) and jitter.saturation == (0.8, 1.2)
    random_interpolation = _of_type(train.dataset.transform, RandomResizedCropAndInterpolation)[0].interpolation
    assert random_interpolation == (T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC)  # one drawn per image
    assert _of_type(val.transform, T.Resize)[0].interpolation == T.InterpolationMode.BICUBIC  # the model's cfg


def test_transform_keys_reach_webdataset_and_hf_dataset_sources(tmp_path, monkeypatch):
    from test_data_sources import digits_png, write_hf_dataset, write_shards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples = {"train": digits_png("train", 8), "validation": digits_png("val", 8)}
    keys = ["model=vit_digits_patch2_8_res", "scale=1,1", "hflip=0.125", "mean=0.25", "train_num_samples=8"]
    wds = write_shards(tmp_path / "wds", samples)
    hf = write_hf_dataset(tmp_path / "hf", samples)
    for data in (f"data_dir=wds/{wds}", f"data_dir=hfds/{hf}"):
        train, val, _, _ = _datasets(keys + [data, f"data_root={tmp_path / 'cache'}"])
        t = train.transform
        assert _of_type(t, T.RandomHorizontalFlip)[0].p == 0.125, data
        assert torch.allclose(_of_type(val.transform, T.Normalize)[0].mean, torch.tensor([0.25]))
        assert next(iter(val))[0].shape == (1, 8, 8)  # grey, as the one-channel digits model takes


def test_unset_keys_are_timm_train_py_defaults_and_the_models_cfg():
    """Defaults = timm train.py's flags; the sentinels take the model's pretrained cfg as timm's resolve_data_config."""
    import timm
    from timm.data import create_transform, resolve_data_config

    import hcvision  # noqa: F401
    from hcvision.data.transforms import TransformOptions, build_timm_transform

    assert TransformOptions.from_config(train_cls.ClsConfig()) == TransformOptions()
    model = timm.create_model("vit_digits_patch2_8_res")
    timm_cfg = resolve_data_config({}, model=model)
    for training in (True, False):
        ours = build_timm_transform(model, training)
        theirs = create_transform(**timm_cfg, is_training=training, **(
            dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=0.4, re_mode="pixel")
            if training else {}))
        assert repr(ours) == repr(theirs)


# -- in_chans=1 ----------------------------------------------------------------------------------------------------
def test_in_chans_1_model_trains_on_an_rgb_folder(tmp_path):
    """The issue's traceback (torchvision normalize, 1 vs 3 channels, after the output directory was written)."""
    data = _rgb_folder(tmp_path / "rgb")
    argv = TINY_RGB_MODEL + [f"data_dir={data}", "model_kwargs.in_chans=1"]
    out = tmp_path / "run"
    assert train_cls.main(argv + QUIET + [f"output_dir={out}", "epochs=1", "global_batch_size=4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == 8 and res["model_kwargs"]["in_chans"] == 1
    train, val, _, _ = _datasets(argv)
    assert train[0][0].shape == (1, 8, 8) and val[0][0].shape == (1, 8, 8)  # grey, at the size the model was built for
    (norm,) = _of_type(val.transform, T.Normalize)
    cfg = create_model("vit_tiny_patch16_224_dhc2", meta=True).pretrained_cfg  # three values each
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert torch.allclose(norm.mean, torch.tensor([sum(w * m for w, m in zip(LUMA, cfg["mean"]))]))
    assert torch.allclose(norm.std, torch.tensor([sum(w * s for w, s in zip(LUMA, cfg["std"]))]))
    train, _, _, _ = _datasets(argv + ["mean=0.485,0.456,0.406"])  # an RGB mean given: its luma
    (norm,) = _of_type(train.dataset.transform, T.Normalize)
    assert torch.allclose(norm.mean, torch.tensor([0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406]))


def test_grey_mean_is_the_luma_of_the_rgb_means():
    """The one-channel mean of RGB data is what PIL's convert('L') gives (an independent computation)."""
    from hcvision.data.transforms import channel_stats

    rng = np.random.default_rng(1)
    rgb = np.stack([rng.integers(lo, lo + 100, (64, 64)) for lo in (20, 90, 150)], -1).astype(np.uint8)
    means = tuple(rgb.reshape(-1, 3).mean(0) / 255)
    grey = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float64) / 255
    assert channel_stats(means, 1, "mean")[0] == pytest.approx(grey.mean(), abs=1 / 255)
    assert channel_stats((0.5,), 3, "mean") == (0.5, 0.5, 0.5)


# -- the digits as an ImageFolder ---------------------------------------------------------------------------------
def test_exported_digits_are_the_embedded_split_and_pixels(exported):
    from sklearn.datasets import load_digits

    from hcvision.data.digits import DIGITS_PNG_STEP

    digits = load_digits()
    for split, idx in zip(("train", "val"), digits_split_indices()):
        files = sorted(exported.glob(f"{split}/*/*.png"))
        assert sorted(int(f.stem) for f in files) == sorted(int(i) for i in idx)
        for f in files[::97]:
            image = Image.open(f)
            assert (image.mode, image.size) == ("L", (8, 8))
            assert int(f.parent.name) == digits.target[int(f.stem)]
            assert np.array_equal(np.asarray(image), digits.images[int(f.stem)].astype(np.uint8) * DIGITS_PNG_STEP)


def test_exported_digits_read_back_as_the_embedded_tensors(exported):
    """The folder path with crop, flip and jitter off and the rescaled normalisation gives the embedded tensors."""
    from hcvision.data.digits import folder_mean_std

    mean, std = folder_mean_std((0.3,), (0.375,))  # the digits models' cfg
    train, val, classes, _ = _datasets(["model=vit_digits_patch2_8_dhc2", f"data_dir={exported}", f"mean={mean[0]!r}",
                                        f"std={std[0]!r}", "scale=1,1", "ratio=1,1", "hflip=0", "color_jitter=0"])
    assert classes == 10
    for split, folder in (("train", train), ("val", val)):
        embedded = DigitsDataset(split, (0.3,), (0.375,))
        position = {int(i): k for k, i in enumerate(digits_split_indices()[0 if split == "train" else 1])}
        assert len(folder) == len(embedded)
        for j in range(0, len(folder), 7):
            x, y = folder[j]
            ref, ref_y = embedded[position[int(Path(folder.samples[j][0]).stem)]]
            assert y == ref_y
            torch.testing.assert_close(x, ref, atol=2e-7, rtol=0)  # float32 rounding of two formulas


def test_export_cli_refuses_bad_targets_in_one_line(tmp_path, capsys):
    from hcvision.data.digits.__main__ import main as digits_main

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target, match in ((full, "is not empty"), (afile, "is a file"), (afile / "sub", "is not a writable directory")):
        assert run_cli(digits_main, ["--export", str(target)], prog="hcvision.data.digits") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err and "accepted" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]  # no partial export left behind
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(digits_main, ["--export", str(empty)]) == 0
    assert "mean=0.28235294 std=0.35294118" in capsys.readouterr().out
    assert sorted(p.name for p in empty.iterdir()) == ["train", "val"]


# -- bad values: exit 2, one line, nothing written ------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["hflip=2"], "a probability in [0, 1]"),
    (["remode=zero"], "'const', 'rand', 'pixel'"),
    (["interpolation=cubic"], "'bilinear', 'bicubic'"),
    (["auto_augment=v1"], "rand, augmix, original"),
    (["auto_augment=rand-q3"], "rand, augmix, original"),  # a known policy whose options timm refuses
    (["scale=0.9,0.1"], "0 < min <= max <= 1"),
    (["mean=0.1,0.2"], "one per channel (1 or 3)"),
    (["std=0"], "one number > 0"),
    (["crop_pct=1.5"], "(0, 1]"),
    (["data_dir=", "hflip=0"], "take only mean, std and digits_augment"),
    (["data_dir=", "mean=0.1,0.2,0.3"], "the embedded digits have one channel"),
    (["digits_augment=true"], "applies to the embedded digits only"),
    (["model_kwargs.in_chans=4"], "model_kwargs.in_chans=1 or 3"),
])
def test_bad_transform_values_exit_2_before_anything_is_written(tmp_path, capsys, args, match):
    data = _rgb_folder(tmp_path / "rgb")
    out = tmp_path / "out"
    rc = train_cls.main(TINY_RGB_MODEL + QUIET + [f"data_dir={data}", f"output_dir={out}"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()
