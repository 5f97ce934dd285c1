"""The classification trainer's data: the embedded digits or an ImageFolder root, as (train, val, classes, collate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence, Tuple

import torch

from ..cli import UsageError
from .digits import DigitsDataset
from .folder import SafeImageFolder, SeededTransformDataset, build_timm_transform, collate_skip_bad

__all__ = ["classification_datasets", "digits_collate"]


def digits_collate(batch: Sequence[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack a digits batch; the trailing 0 is the count of unreadable files (the folder collate's contract)."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), 0


def model_in_chans(model: torch.nn.Module) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return proj.in_channels if proj is not None else model.pretrained_cfg.get("input_size", (3,))[0]


def classification_datasets(data_dir: str, model: torch.nn.Module, *, seed: int = 0, digits_augment: bool = False,
                            img_size: int = 0, auto_augment: str = "", reprob: float = 0.0
                            ) -> Tuple[Any, Any, int, Callable]:
    """(train set, val set, number of classes, collate_fn) with the model's preprocessing (mean/std, size)."""
    if not data_dir:
        mean, std = model.pretrained_cfg.get("mean", (0.5,)), model.pretrained_cfg.get("std", (0.5,))
        train = DigitsDataset("train", mean, std, augment=digits_augment, seed=seed)
        return train, DigitsDataset("val", mean, std), DigitsDataset.num_classes, digits_collate
    root, in_chans = Path(data_dir), model_in_chans(model)
    t_train = build_timm_transform(model, True, img_size=img_size, auto_augment=auto_augment, reprob=reprob)
    t_val = build_timm_transform(model, False, img_size=img_size)
    train = SeededTransformDataset(SafeImageFolder(root / "train", t_train, in_chans=in_chans), seed=seed)
    val = SafeImageFolder(root / "val", t_val, in_chans=in_chans)
    if train.classes != val.classes:
        raise UsageError(f"data_dir={data_dir!r}: train/ has classes {train.classes[:5]}... but val/ has "
                         f"{val.classes[:5]}...; both must hold the same class folders")
    return train, val, len(train.classes), collate_skip_bad
