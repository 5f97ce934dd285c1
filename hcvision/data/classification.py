"""The classification trainer's data: the embedded digits, an ImageFolder root, WebDataset shards or a Hugging Face
dataset (see :mod:`.sources`), as (train, val, classes, collate)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from ..cli import UsageError
from .digits import DigitsDataset
from .folder import SafeImageFolder, SeededTransformDataset, check_image_folder, collate_skip_bad
from .sources import DataSource, default_val_split, hfds_dataset, wds_dataset
from .transforms import TransformOptions, build_timm_transform, model_in_chans

# The embedded digits are tensors already: of the transform keys only the normalisation applies to them.
DIGITS_KEYS = ("mean", "std")

__all__ = ["classification_datasets", "check_input_size", "digits_collate", "model_in_chans", "DIGITS_KEYS"]


def digits_collate(batch: Sequence[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack a digits batch; the trailing 0 is the count of unreadable files (the folder collate's contract)."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), 0


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


def check_digits_fit(model: torch.nn.Module) -> None:
    """The embedded digits are 1x8x8 images: a model built for other inputs is an error now, before any output."""
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    chans = model_in_chans(model)
    size = tuple(getattr(getattr(model, "patch_embed", None), "img_size", None) or ())
    if chans != 1 or (size and size != (8, 8) and not getattr(model.patch_embed, "dynamic_img_size", False)):
        raise UsageError(f"model={name!r} as built takes {chans}x{'x'.join(map(str, size)) or '?'} images, but the "
                         "embedded digits (data_dir='') are 1x8x8; accepted: a model for 1x8x8 input (drop "
                         "model_kwargs.in_chans / model_kwargs.img_size), or image data (data_dir=DIR)")


def classification_datasets(source: DataSource, model: torch.nn.Module, *, seed: int = 0, digits_augment: bool = False,
                            transform: Optional[TransformOptions] = None, train_split: str = "train",
                            val_split: str = "", train_num_samples: int = 0,
                            num_classes: Optional[int] = None
                            ) -> Tuple[Any, Any, int, Callable]:
    """(train set, val set, number of classes, collate_fn) with the model's preprocessing under ``transform``.

    Image sources go through timm's transforms (:mod:`.transforms`), decoded to RGB or, for a model with
    ``in_chans=1``, to grey. The embedded digits take only ``mean``/``std`` of the transform keys (and
    ``digits_augment``); any other key set there is an error, as is ``digits_augment`` for an image source.
    ``val_split`` '' is the source's default (:func:`.sources.default_val_split`). ``num_classes`` (the model's class
    count when it was given, else None) must match the data's; WebDataset shards whose ``_info.json`` does not give a
    class count take it from there. ``img_size`` must fit the model (:func:`check_input_size`).
    """
    options = transform or TransformOptions()
    if source.kind == "digits":
        stray = {k: v for k, v in options.changed().items() if k not in DIGITS_KEYS}
        if stray:
            key, value = next(iter(stray.items()))
            raise UsageError(f"{key}={list(value) if isinstance(value, tuple) else value!r} does not apply to the "
                             "embedded digits (data_dir=''), which take only mean, std and digits_augment; drop "
                             f"{', '.join(stray)}, or export the digits as an image folder (python -m "
                             "hcvision.data.digits --export DIR) and train with data_dir=DIR")
        mean = options.mean or model.pretrained_cfg.get("mean", (0.5,))
        std = options.std or model.pretrained_cfg.get("std", (0.5,))
        for key, values in (("mean", options.mean), ("std", options.std)):
            if len(values) > 1:
                raise UsageError(f"{key}={list(values)} has {len(values)} values but the embedded digits have one "
                                 "channel; accepted: one value, or [] (the model's)")
        check_digits_fit(model)
        train = DigitsDataset("train", mean, std, augment=digits_augment, seed=seed)
        val, classes, collate = DigitsDataset("val", mean, std), DigitsDataset.num_classes, digits_collate
    else:
        if digits_augment:
            raise UsageError(f"digits_augment=true applies to the embedded digits only, not to data_dir="
                             f"{source.describe()!r}; accepted: scale, ratio, hflip, vflip, color_jitter, "
                             "auto_augment, reprob for image data")
        check_input_size(model, options.img_size)
        val_split = val_split or default_val_split(source)
        in_chans = model_in_chans(model)
        if in_chans not in (1, 3):
            raise UsageError(f"the model takes in_chans={in_chans} but images decode to 1 (grey) or 3 (RGB) channels; "
                             "accepted: model_kwargs.in_chans=1 or 3 for data_dir=" + repr(source.describe()))
        mode = "L" if in_chans == 1 else "RGB"
        t_train, t_val = build_timm_transform(model, True, options), build_timm_transform(model, False, options)
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
