"""The classification trainer's data: the embedded digits, an ImageFolder root, WebDataset shards or a Hugging Face
dataset (see :mod:`.sources`), as (train, val, classes, collate)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from ..cli import UsageError
from .digits import DigitsDataset
from .folder import SafeImageFolder, SeededTransformDataset, build_timm_transform, check_image_folder, collate_skip_bad
from .sources import DataSource, default_val_split, hfds_dataset, wds_dataset

__all__ = ["classification_datasets", "check_input_size", "digits_collate", "model_in_chans"]


def digits_collate(batch: Sequence[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack a digits batch; the trailing 0 is the count of unreadable files (the folder collate's contract)."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), 0


def model_in_chans(model: torch.nn.Module) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return proj.in_channels if proj is not None else model.pretrained_cfg.get("input_size", (3,))[0]


def check_input_size(model: torch.nn.Module, img_size: int) -> None:
    """An ``img_size`` the model cannot take is an error now, not after outputs were written mid-training."""
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    embed = getattr(model, "patch_embed", None)
    fixed = tuple(getattr(embed, "img_size", None) or ())
    strict = getattr(embed, "strict_img_size", True) and not getattr(embed, "dynamic_img_size", False)
    if img_size and fixed and strict and (img_size, img_size) != fixed:
        raise UsageError(f"img_size={img_size} does not fit model={name!r}, "
                         f"which takes {fixed[0]}x{fixed[1]} images; accepted: img_size=0 (the model's size), "
                         f"img_size={fixed[0]}, or model_kwargs.img_size={img_size} / "
                         "model_kwargs.dynamic_img_size=true")


def classification_datasets(source: DataSource, model: torch.nn.Module, *, seed: int = 0, digits_augment: bool = False,
                            img_size: int = 0, auto_augment: str = "", reprob: float = 0.0, train_split: str = "train",
                            val_split: str = "", train_num_samples: int = 0,
                            num_classes: Optional[int] = None
                            ) -> Tuple[Any, Any, int, Callable]:
    """(train set, val set, number of classes, collate_fn) with the model's preprocessing (mean/std, size).

    ``val_split`` '' is the source's default (:func:`.sources.default_val_split`). ``num_classes`` (the model's class
    count when it was given, else None) must match the data's; WebDataset shards whose ``_info.json`` does not give a
    class count take it from there. ``img_size`` must fit the model (:func:`check_input_size`).
    """
    if source.kind == "digits":
        mean, std = model.pretrained_cfg.get("mean", (0.5,)), model.pretrained_cfg.get("std", (0.5,))
        train = DigitsDataset("train", mean, std, augment=digits_augment, seed=seed)
        val, classes, collate = DigitsDataset("val", mean, std), DigitsDataset.num_classes, digits_collate
    else:
        check_input_size(model, img_size)
        val_split = val_split or default_val_split(source)
        in_chans = model_in_chans(model)
        mode = "L" if in_chans == 1 else "RGB"
        t_train = build_timm_transform(model, True, img_size=img_size, auto_augment=auto_augment, reprob=reprob)
        t_val = build_timm_transform(model, False, img_size=img_size)
        collate = collate_skip_bad
        if source.kind == "wds":
            train, info_classes = wds_dataset(source, train_split, t_train, training=True, seed=seed,
                                              num_samples=train_num_samples, mode=mode)
            val, _ = wds_dataset(source, val_split, t_val, training=False, seed=seed, mode=mode)
            classes = info_classes or num_classes or 0
            if not classes:
                raise UsageError(f"data_dir={source.timm_name!r}: the number of classes is unknown; accepted: "
                                 "\"num_classes\": N in the shards' _info.json, or model_kwargs.num_classes=N")
        else:
            if source.kind == "hfds":
                train_images = hfds_dataset(source, train_split, t_train, mode)
                val = hfds_dataset(source, val_split, t_val, mode)
            else:
                check_image_folder(source.location, (train_split, val_split))
                train_images = SafeImageFolder(f"{source.location}/{train_split}", t_train, in_chans=in_chans)
                val = SafeImageFolder(f"{source.location}/{val_split}", t_val, in_chans=in_chans)
            train_images.check_readable()
            val.check_readable()
            if train_images.classes != val.classes:
                raise UsageError(f"data_dir={source.describe()!r}: split {train_split!r} has classes "
                                 f"{train_images.classes[:5]}... but {val_split!r} has {val.classes[:5]}...; both "
                                 "must hold the same class folders (ClassLabel names)")
            train, classes = SeededTransformDataset(train_images, seed=seed), len(train_images.classes)
    if num_classes is not None and num_classes != classes:
        raise UsageError(f"model_kwargs.num_classes={num_classes!r} does not match the {classes} classes of the "
                         "data; drop it or use matching data")
    return train, val, classes, collate
