"""ImageFolder data (``data_dir/{train,val}/<class>/<image>``) with timm transforms.

Unreadable images are skipped, not fatal: the sample comes back as ``None``, a warning names the
file, and :func:`collate_skip_bad` drops it and reports the count in the batch so the training
script can total it across workers and ranks (a count kept inside a worker process would be lost).
"""
from __future__ import annotations

import random
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..cli import UsageError

__all__ = ["SafeImageFolder", "SeededTransformDataset", "collate_skip_bad", "check_image_folder",
           "build_timm_transform", "seeded_call", "probe_readable"]

SPLITS = ("train", "val")


def check_image_folder(data_dir: Union[str, Path], splits: Sequence[str] = SPLITS) -> None:
    """Fail early, with a one-line reason, unless ``data_dir`` has a folder of class folders for every split."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"data_dir={str(root)!r} does not exist; expected a folder with {'/ and '.join(splits)}/ "
                         "sub-folders of class folders (or data_dir='' for the embedded digits, wds/DIR, hfds/NAME)")
    for split in splits:
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise UsageError(f"data_dir={str(root)!r} has no class folders in {split}/; expected "
                              f"{split}/<class>/<image> (ImageFolder layout)")


def pil_loader(path: str, mode: str = "RGB") -> Any:
    """Open an image fully (``convert`` forces decoding, so truncated files fail here, not later)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


class SafeImageFolder(ImageFolder):
    """``torchvision`` ImageFolder whose unreadable files yield ``None`` with a warning.

    ``in_chans=1`` decodes to greyscale ("L"), otherwise RGB.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None, in_chans: int = 3) -> None:
        try:
            super().__init__(str(root), transform=transform,
                             loader=partial(pil_loader, mode="L" if in_chans == 1 else "RGB"))
        except FileNotFoundError as e:  # a class folder without images (torchvision names it)
            raise UsageError(f"{str(root)!r}: {str(e).splitlines()[0]}; accepted: every class folder holds images "
                             f"with an extension in {', '.join(IMG_EXTENSIONS)}") from None

    def check_readable(self, probe: int = 16) -> None:
        """Fail before training unless some of the first ``probe`` images (spread over the set) can be decoded."""
        probe_readable(repr(self.root), len(self.samples), lambda i: self.loader(self.samples[i][0]), probe)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, ...
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class SeededTransformDataset(Dataset):
    """Wrap a data set so each sample's random augmentation is seeded by (seed, epoch, index).

    timm's transforms draw from Python's ``random`` and torch's global RNG.  Seeding them per sample
    (and restoring the caller's RNG state afterwards) makes augmentation independent of worker
    count and of where a resumed run restarts, which is what exact resume needs.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # classes, samples, ... of the wrapped folder
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        return seeded_call(self.dataset.__getitem__, index, (self.seed, self.epoch, index))


def seeded_call(fn: Callable, arg: Any, key: Sequence[int]) -> Any:
    """``fn(arg)`` with Python's ``random`` and torch's global RNG seeded by ``key`` (restored afterwards): random
    augmentation that depends on the sample, not on the worker or on where a resumed run restarts."""
    s = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(s)
    random.seed(s)
    try:
        return fn(arg)
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


def probe_readable(name: str, n: int, load: Callable[[int], Any], probe: int = 16) -> None:
    """Raise :class:`UsageError` unless one of ``probe`` samples spread over ``range(n)`` decodes (``load(i)``)."""
    if n == 0:
        raise UsageError(f"{name} holds no images")
    indices = list(range(0, n, max(1, n // probe)))[:probe]
    errors = []
    for i in indices:
        try:
            load(i)
            return
        except Exception as e:  # PIL raises many types for unreadable files
            errors.append(f"{type(e).__name__}: {e}")
    raise UsageError(f"{name}: none of {len(indices)} probed images could be decoded (e.g. {errors[0][:200]}); "
                     "accepted: image files PIL can read")


def collate_skip_bad(batch: Sequence[Optional[Tuple[Any, int]]],
                     keep_size: bool = False) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Collate ``(image, target)`` samples whose unreadable entries are ``None``.

    Returns ``(images, targets, n_skipped)``.  By default unreadable samples are dropped.  With
    ``keep_size=True`` they are replaced by a zero image with target ``-1`` instead, so every rank's
    batch keeps its shape (what ``gather_for_metrics`` needs in evaluation); count only
    ``targets >= 0``.
    """
    good: List[Tuple[Any, int]] = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    if keep_size and skipped:
        blank = (torch.zeros_like(torch.as_tensor(good[0][0])), -1)
        good = [b if b is not None else blank for b in batch]
    images, targets = default_collate(good)
    return images, targets, skipped


def build_timm_transform(model: torch.nn.Module, is_training: bool, *, img_size: int = 0,
                         auto_augment: Optional[str] = None, reprob: float = 0.0) -> Callable:
    """timm's train/eval transform for ``model`` (its pretrained cfg sets size, mean, std, crop)."""
    from timm.data import create_transform, resolve_data_config

    args = {}
    if img_size:
        chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
        args["input_size"] = (chans, img_size, img_size)
    data_cfg = resolve_data_config(args, model=model)
    kwargs = dict(input_size=data_cfg["input_size"], interpolation=data_cfg["interpolation"],
                  mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"],
                  crop_mode=data_cfg.get("crop_mode", "center"), is_training=is_training)
    if is_training:
        kwargs.update(auto_augment=auto_augment or None, re_prob=reprob)
    return create_transform(**kwargs)
