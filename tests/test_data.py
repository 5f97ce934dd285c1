"""Tests of hcvision.data: the embedded digits split and the fault-tolerant ImageFolder."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from hcvision.cli import UsageError as ConfigError
from hcvision.data import (
    DigitsDataset,
    SafeImageFolder,
    SeededTransformDataset,
    check_image_folder,
    collate_skip_bad,
    digits_split_indices,
)


def test_digits_split_fixed_stratified_disjoint():
    from sklearn.datasets import load_digits

    tr, va = digits_split_indices()
    assert len(tr) + len(va) == 1797 and len(va) == 360
    assert not set(tr) & set(va)
    y = load_digits().target
    # Stratified: each class's share of val is within one image of 20 %.
    for c in range(10):
        n_c = (y == c).sum()
        assert abs((y[va] == c).sum() - 0.2 * n_c) <= 1
    # Deterministic and independent of the training seed (and of the global RNGs).
    torch.manual_seed(123)
    np.random.seed(5)
    tr2, va2 = digits_split_indices.__wrapped__()
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    a, b = DigitsDataset("val", seed=0), DigitsDataset("val", seed=99)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.images, b.images)


def test_digits_normalisation_and_errors():
    from sklearn.datasets import load_digits

    ds = DigitsDataset("train", mean=(0.3,), std=(0.375,))
    tr, _ = digits_split_indices()
    raw = torch.from_numpy(load_digits().images[tr[0]].astype(np.float32)) / 16.0
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and isinstance(y, int)
    assert torch.allclose(x[0], (raw - 0.3) / 0.375)
    with pytest.raises(ValueError, match="split='test'.*'train', 'val'"):
        DigitsDataset("test")


def test_digits_augment_seeded_by_epoch_and_index():
    ds = DigitsDataset("train", augment=True, seed=1)
    ds.set_epoch(0)
    first = torch.stack([ds[i][0] for i in range(20)])
    # Global RNG state does not matter; the same (seed, epoch, index) gives the same image.
    torch.manual_seed(0)
    assert torch.equal(first, torch.stack([ds[i][0] for i in range(20)]))
    ds.set_epoch(1)
    assert not torch.equal(first, torch.stack([ds[i][0] for i in range(20)]))
    plain = DigitsDataset("train")
    assert not torch.equal(first, plain.images[:20])  # some images were shifted
    # A shift moves pixels, never invents new values other than the background.
    vals = set(plain.images[:20].unique().tolist()) | {plain.background}
    assert set(first.unique().tolist()) <= vals


def _folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_safe_image_folder_skips_corrupt_file_with_warning_and_count(tmp_path):
    from torchvision.transforms import ToTensor

    ds = SafeImageFolder(_folder(tmp_path) / "train", transform=ToTensor())
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg")]
    assert len(ds) == 7 and len(bad) == 1
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image .*broken\.jpg"):
        batch = [ds[i] for i in range(len(ds))]
    assert batch[bad[0]] is None
    x, y, skipped = collate_skip_bad(batch)
    assert skipped == 1 and x.shape == (6, 3, 6, 6) and y.tolist() == [0, 0, 0, 1, 1, 1]
    x, y, skipped = collate_skip_bad(batch, keep_size=True)  # evaluation: same shape, target -1
    assert skipped == 1 and x.shape == (7, 3, 6, 6) and y[bad[0]] == -1 and (y >= 0).sum() == 6
    assert torch.equal(x[bad[0]], torch.zeros(3, 6, 6))
    x, y, skipped = collate_skip_bad([None, None])
    assert skipped == 2 and x.numel() == 0 and y.numel() == 0


def test_greyscale_folder_and_seeded_transform(tmp_path):
    from torchvision import transforms as T

    root = _folder(tmp_path, corrupt=False)
    t = T.Compose([T.RandomResizedCrop(4), T.ToTensor()])
    ds = SeededTransformDataset(SafeImageFolder(root / "train", transform=t, in_chans=1), seed=3)
    assert ds.classes == ["a", "b"]
    x0 = ds[0][0]
    assert x0.shape == (1, 4, 4)
    random.seed(0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert torch.equal(ds[0][0], x0)  # a pure function of (seed, epoch, index)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left untouched
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], SeededTransformDataset(ds.dataset, seed=3)[i][0]) for i in range(6))


def test_check_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_image_folder(tmp_path / "missing")
    (tmp_path / "d" / "train" / "x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no class folders in val/"):
        check_image_folder(tmp_path / "d")
    check_image_folder(_folder(tmp_path / "ok", corrupt=False))
