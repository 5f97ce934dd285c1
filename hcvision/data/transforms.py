"""The image transforms of the classification trainer: timm's ``create_transform``, controlled by the keys of timm's
``train.py`` (``scale``, ``ratio``, ``hflip``, ``vflip``, ``color_jitter``, ``auto_augment``, ``reprob`` / ``remode``
/ ``recount``, ``interpolation``, ``crop_pct``, ``mean``, ``std``, ``img_size``).

Defaults follow timm's ``resolve_data_config``: a key left at its sentinel (``''``, ``0``, ``()``) takes the model's
value (its pretrained cfg, and the size and channels the model was built with), the augmentation keys take timm
``train.py``'s defaults. Image folders, WebDataset shards and Hugging Face datasets decode to RGB, or to greyscale
("L") for a model built with ``in_chans=1``; a mean/std given for the other channel count is adapted
(:func:`channel_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..cli import UsageError

__all__ = ["AUTO_AUGMENT_POLICIES", "CHECKS", "INTERPOLATIONS", "LUMA", "RE_MODES", "TransformOptions", "as_tuple",
           "build_timm_transform", "channel_stats", "model_in_chans", "resolve_data_config"]

AUTO_AUGMENT_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")  # timm's auto_augment.py
INTERPOLATIONS = ("", "random", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
RE_MODES = ("const", "rand", "pixel")  # timm's RandomErasing fill modes
def as_tuple(value: Union[float, Sequence[float]]) -> Tuple[float, ...]:
    """A mean or std given as one number (``mean=0.5``, timm's ``--mean 0.5``) or as several."""
    return (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)


PROBABILITY = (lambda v: 0 <= v <= 1, "a probability in [0, 1]")
# Each key's accepted values, for the config fields that carry them (ClsConfig: checked(default, *CHECKS[key])).
CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "scale": (lambda v: 0 < v[0] <= v[1] <= 1, "two numbers, 0 < min <= max <= 1"),
    "ratio": (lambda v: 0 < v[0] <= v[1], "two numbers, 0 < min <= max"),
    "hflip": PROBABILITY,
    "vflip": PROBABILITY,
    "color_jitter": (lambda v: v >= 0, "a number >= 0 (0 disables)"),
    "auto_augment": (lambda v: not v or v.split("-")[0] in AUTO_AUGMENT_POLICIES,
                     f"'' (none) or a timm policy ({', '.join(AUTO_AUGMENT_POLICIES)}), e.g. 'rand-m9-mstd0.5-inc1'"),
    "reprob": PROBABILITY,
    "remode": (lambda v: v in RE_MODES, f"one of {RE_MODES}"),
    "recount": (lambda v: v >= 1, "an integer >= 1"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {INTERPOLATIONS} ('': the model's)"),
    "crop_pct": (lambda v: 0 <= v <= 1, "a number in (0, 1], or 0 (the model's)"),
    "mean": (lambda v: len(as_tuple(v)) in (0, 1, 3), "[] (the model's), one number, or one per channel (1 or 3)"),
    "std": (lambda v: len(as_tuple(v)) in (0, 1, 3) and all(x > 0 for x in as_tuple(v)),
            "[] (the model's), one number > 0, or one per channel (1 or 3)"),
    "img_size": (lambda v: v >= 0, "an integer >= 0 (0: the model's)"),
}
# ITU-R 601-2 luma, what PIL's convert("L") computes: RGB data with channel means m has the grey mean LUMA . m
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class TransformOptions:
    """The transform keys, with timm ``train.py``'s defaults; ``''``/``0``/``()`` mean the model's value.

    ``scale``/``ratio``/``hflip``/``vflip``/``color_jitter``/``auto_augment``/``reprob``/``remode``/``recount`` act in
    training only, ``crop_pct`` in evaluation only; ``interpolation='random'`` picks one per training image (timm's
    ``--train-interpolation random``) and evaluation keeps the model's.
    """

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    auto_augment: str = ""
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    interpolation: str = ""
    crop_pct: float = 0.0
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    img_size: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "TransformOptions":
        """The options of a config object that has these fields (``ClsConfig``)."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls)}
        return cls(**{**values, **{k: as_tuple(values[k]) for k in ("scale", "ratio", "mean", "std")}})

    def changed(self) -> Dict[str, Any]:
        """The keys set to something other than their default, in declaration order."""
        default = TransformOptions()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


def channel_stats(values: Sequence[float], in_chans: int, key: str) -> Tuple[float, ...]:
    """``values`` (a mean or std) for ``in_chans`` channels: one value is repeated (as timm does); RGB values become
    one grey value by the luma weights (exact for the mean of PIL-converted images, an upper bound for the std, reached
    when the channels are fully correlated, as they nearly are in natural images)."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if len(values) == 3 and in_chans == 1:
        return (sum(w * v for w, v in zip(LUMA, values)),)
    raise UsageError(f"{key}={list(values)} has {len(values)} values but the model takes {in_chans} input channel(s); "
                     f"accepted: one value, or {in_chans}")


def model_in_chans(model: torch.nn.Module) -> int:
    """The input channels the model was built with (its patch embedding's, else its pretrained cfg's)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return proj.in_channels if proj is not None else model.pretrained_cfg.get("input_size", (3,))[0]


def _model_img_size(model: torch.nn.Module) -> Tuple[int, int]:
    """The size the model was built for: its patch embedding's (``model_kwargs.img_size``), else its cfg's."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed:
        return tuple(int(s) for s in fixed)  # type: ignore[return-value]
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])  # type: ignore[return-value]


def resolve_data_config(model: torch.nn.Module, options: Optional[TransformOptions] = None) -> Dict[str, Any]:
    """timm's ``resolve_data_config`` with the options as its arguments, for the model as built: ``input_size`` is
    ``(in_chans, H, W)`` of the model (or ``img_size``), mean and std have one value per input channel."""
    from timm.data import resolve_data_config as timm_resolve

    o = options or TransformOptions()
    in_chans = model_in_chans(model)
    size = (o.img_size, o.img_size) if o.img_size else _model_img_size(model)
    args = {"input_size": (in_chans, *size), "crop_pct": o.crop_pct or None,
            "interpolation": o.interpolation if o.interpolation not in ("", "random") else None}
    cfg = timm_resolve(args, model=model)
    cfg["mean"] = channel_stats(o.mean or cfg["mean"], in_chans, "mean")
    cfg["std"] = channel_stats(o.std or cfg["std"], in_chans, "std")
    return cfg


def build_timm_transform(model: torch.nn.Module, is_training: bool,
                         options: Optional[TransformOptions] = None) -> Callable:
    """timm's train or eval transform for ``model`` under ``options`` (:func:`resolve_data_config`)."""
    from timm.data import create_transform

    o = options or TransformOptions()
    cfg = resolve_data_config(model, o)
    kwargs = dict(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                  crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"), is_training=is_training)
    if is_training:
        kwargs.update(scale=o.scale, ratio=o.ratio, hflip=o.hflip, vflip=o.vflip, color_jitter=o.color_jitter,
                      auto_augment=o.auto_augment or None, re_prob=o.reprob, re_mode=o.remode, re_count=o.recount)
        if o.interpolation == "random":
            kwargs["interpolation"] = "random"
    try:
        return create_transform(**kwargs)
    except (AssertionError, ValueError, KeyError) as e:  # timm parses the auto-augment string with asserts
        if not o.auto_augment:
            raise
        raise UsageError(f"auto_augment={o.auto_augment!r} is not a valid timm policy ({e}); accepted: "
                         f"{', '.join(AUTO_AUGMENT_POLICIES)}, with options such as 'rand-m9-mstd0.5-inc1'") from None
