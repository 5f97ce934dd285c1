"""The embedded data set: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes).

It ships inside scikit-learn, so every script runs offline.  The held-out split is a fixed
stratified 80/20 split whose seed is independent of the training seed: changing ``seed=`` never
moves an image between train and val.

``python -m hcvision.data.digits --export DIR`` writes the same split as an ImageFolder
(``DIR/{train,val}/<class>/<index>.png``, 8x8 8-bit greyscale) for image-folder tools such as timm's
``train.py`` / ``validate.py`` and ``train_cls.py data_dir=DIR``. A digit pixel holds an integer
k in 0..16 and the embedded path feeds k/16; no 8-bit grey level v gives v/255 = k/16, so the PNGs
hold v = 15k exactly (v/255 = k/17) and the folder's normalisation is the embedded one rescaled by
16/17 (:func:`folder_mean_std`): the folder path then yields the embedded tensors (to float32 rounding).
"""
from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ...cli import UsageError

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_VAL_FRACTION", "DIGITS_PNG_STEP", "digits_split_indices", "DigitsDataset",
           "export_image_folder", "folder_mean_std", "digits_pixels"]

DIGITS_SPLIT_SEED = 20240917
DIGITS_VAL_FRACTION = 0.2
DIGITS_NUM_CLASSES = 10
DIGITS_LEVELS = 16  # a pixel is an integer in 0..16 (scikit-learn's 4x4-block counts); the embedded path feeds k / 16
DIGITS_PNG_STEP = 15  # grey level per count in the exported PNGs: 0..240, read back as k * 15 / 255 = k / 17
SPLITS = ("train", "val")


@lru_cache(maxsize=1)
def _load() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / DIGITS_LEVELS)[:, None]  # (N, 1, 8, 8) in [0, 1]
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


def folder_mean_std(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation of the exported PNGs that gives the embedded tensors ``(k/16 - mean) / std``.

    The PNGs read back as ``y = k/17 = (16/17) k/16``, so ``(y - 16/17 mean) / (16/17 std)`` equals
    ``(k/16 - mean) / std``.
    """
    rescale = DIGITS_PNG_STEP * DIGITS_LEVELS / 255.0  # 16/17
    return tuple(float(m) * rescale for m in mean), tuple(float(s) * rescale for s in std)


def _check_target(root: Path) -> None:
    """A target must be a new or empty directory in a writable place (checked before anything is written)."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"--export {str(root)!r} is a file; accepted: a new or empty directory")
    if root.is_dir() and any(root.iterdir()):
        raise UsageError(f"--export {str(root)!r} is not empty; accepted: a new or empty directory (the export "
                         "never mixes with other files)")
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--export {str(root)!r}: {str(parent)!r} is not a writable directory; accepted: a new or "
                         "empty directory in a writable place")


def export_image_folder(root: os.PathLike | str) -> Dict[str, int]:
    """Write the digits split as ``root/{train,val}/<class>/<index>.png`` (``index``: scikit-learn's sample index).

    The images and split are those of :class:`DigitsDataset`; pixel ``k`` becomes grey level ``15 k``. The folder is
    written next to ``root`` under a temporary name and renamed at the end, so ``root`` is complete or absent.
    Returns the image count per split.
    """
    from PIL import Image

    root = Path(root)
    _check_target(root)
    images, labels = _load()
    counts = np.rint(images[:, 0] * DIGITS_LEVELS).astype(np.int64)  # the integer counts, exactly (k/16 is exact)
    tmp = root.parent / f".{root.name}.export-{os.getpid()}"  # beside root: the final rename stays on one file system
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed export that had this process id
        tmp.mkdir(parents=True)  # (mkdir honours the umask, where mkdtemp would make it private)
    except OSError as e:  # e.g. a read-only file system, which os.access does not see for root
        raise UsageError(f"--export {str(root)!r} cannot be created ({e.strerror}); accepted: a new or empty "
                         "directory in a writable place") from None
    try:
        written = {}
        for split, idx in zip(SPLITS, digits_split_indices()):
            for c in range(DIGITS_NUM_CLASSES):
                (tmp / split / str(c)).mkdir(parents=True)
            for i in idx:
                grey = (counts[i] * DIGITS_PNG_STEP).astype(np.uint8)
                Image.fromarray(grey).save(tmp / split / str(int(labels[i])) / f"{int(i):04d}.png")
            written[split] = len(idx)
        if root.is_dir():
            root.rmdir()  # empty (checked): rename() needs the name free
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def digits_pixels(split: str) -> Dataset:
    """The digits split as ``(x in [-1, 1] of shape (1, 8, 8), label)``: the DiT digits cfg's mean = std = 0.5.

    No shift augmentation: the model is scored against the unshifted held-out digits.
    """
    return DigitsDataset(split, mean=(0.5,), std=(0.5,), augment=False)
