"""The embedded data set: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes).

It ships inside scikit-learn, so every script runs offline.  The held-out split is a fixed
stratified 80/20 split whose seed is independent of the training seed: changing ``seed=`` never
moves an image between train and val.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_VAL_FRACTION", "digits_split_indices", "DigitsDataset", "digits_pixels"]

DIGITS_SPLIT_SEED = 20240917
DIGITS_VAL_FRACTION = 0.2
DIGITS_NUM_CLASSES = 10
SPLITS = ("train", "val")


@lru_cache(maxsize=1)
def _load() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return images, d.target.astype(np.int64)


@lru_cache(maxsize=4)
def digits_split_indices(val_fraction: float = DIGITS_VAL_FRACTION,
                         split_seed: int = DIGITS_SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices of a stratified split; a pure function of its arguments."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is not valid; expected a number in (0, 1)")
    _, y = _load()
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=split_seed, stratify=y)
    return np.sort(tr), np.sort(va)


class DigitsDataset(Dataset):
    """One split of the digits, normalised with a model's ``mean``/``std``.

    Args:
        split: ``"train"`` or ``"val"``.
        mean, std: per-channel normalisation (the model's pretrained cfg); only the first value is
            used because the images have one channel.
        augment: random translation by up to ``max_shift`` pixels (zero padded), drawn from a
            generator seeded by (seed, epoch, index) so augmentation is reproducible and
            independent of data-loader workers and of where a resumed run starts.
        seed: augmentation seed.
    """

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train", mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 augment: bool = False, max_shift: int = 1, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; expected one of {SPLITS}")
        images, labels = _load()
        tr, va = digits_split_indices()
        idx = tr if split == "train" else va
        x = torch.from_numpy(images[idx])
        self.images = (x - float(mean[0])) / float(std[0])
        self.background = (0.0 - float(mean[0])) / float(std[0])
        self.targets = torch.from_numpy(labels[idx])
        self.split = split
        self.augment = augment
        self.max_shift = int(max_shift)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def _shift(self, x: torch.Tensor, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)
        dy, dx = (torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=g)).tolist()
        s = self.max_shift
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=self.background)
        h, w = x.shape[-2:]
        return padded[..., s + dy: s + dy + h, s + dx: s + dx + w]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.augment and self.max_shift > 0:
            x = self._shift(x, index)
        return x, int(self.targets[index])

    @property
    def classes(self) -> Optional[list]:
        return [str(i) for i in range(self.num_classes)]


def digits_pixels(split: str) -> Dataset:
    """The digits split as ``(x in [-1, 1] of shape (1, 8, 8), label)``: the DiT digits cfg's mean = std = 0.5.

    No shift augmentation: the model is scored against the unshifted held-out digits.
    """
    return DigitsDataset(split, mean=(0.5,), std=(0.5,), augment=False)
