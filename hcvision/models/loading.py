"""Rebuilding models from weights files, next to the models: names, kwargs, key conversion, loading.

- :func:`check_model_name` and :func:`create_model` turn a bad name or kwarg into one :class:`UsageError` line.
- :func:`filter_checkpoint` maps a state dict in any layout a family accepts (hcvision, timm/official, diffusers)
  to the model's own; :func:`load_state_into` loads it strictly.
- :func:`load_model` rebuilds a registered model from a weights file and the name and kwargs recorded in its
  metadata (:func:`recorded_model`: what the trainers write).
- :func:`load_dinov2` builds a frozen timm DINOv2 ViT from a local file: the FD-DINOv2 features
  (:mod:`hcvision.eval.dinov2`) and REPA's encoder (:mod:`hcvision.diffusion.repa`) both use it.

Files are read by :mod:`hcvision.io` (nothing unpickled); this module is above it and above the model families.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..cli import UsageError
from ..io import PathLike, _first_line, check_finite, file_sha256, layout_mismatch, load_weights, resolve_weights
from .convert import dit_checkpoint_filter_fn, vit_checkpoint_filter_fn
from .dit import HCDiT
from .vit import HCVisionTransformer

__all__ = [
    "check_model_name", "create_model", "filter_checkpoint", "load_state_into", "recorded_model", "load_model",
    "load_dinov2", "DEFAULT_DINOV2_MODEL", "DINOV2_INPUT_SIZE",
]

DEFAULT_DINOV2_MODEL = "vit_large_patch14_dinov2.lvd142m"
DINOV2_INPUT_SIZE = 224


def filter_checkpoint(state_dict: Dict[str, Any], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict in any layout a family accepts (hcvision, timm/official, diffusers) -> ``model``'s own.

    Every tensor must fit ``model`` as built (no head reset or channel adaptation: that is timm's
    ``pretrained=True`` path); missing connection parameters take the model's Pre-Norm-equivalent init.
    """
    if isinstance(model, HCDiT):
        return dit_checkpoint_filter_fn(state_dict, model, timm_adapts=False)
    if isinstance(model, HCVisionTransformer):
        return vit_checkpoint_filter_fn(state_dict, model, timm_adapts=False)
    return dict(state_dict)


def check_model_name(name: str, family: str = "", what: str = "timm model", key: str = "model") -> None:
    """Raise :class:`UsageError` unless ``name`` is a registered timm model whose name starts with ``family``,
    suggesting close names."""
    import difflib

    import timm

    if timm.is_model(name) and name.startswith(family):
        return
    names = timm.list_models(f"{family}*")
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    if not close:  # e.g. a typo in the size part: match on the family prefix instead
        close = [n for n in names if n.startswith(name.split("_")[0] + "_")][:4]
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise UsageError(f"{key}={name!r} is not a registered {what}{hint}")


def recorded_model(metadata: Mapping[str, str], source: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """The model name and kwargs a trainer recorded in a weights file's metadata."""
    name = metadata.get("model") or metadata.get("model_name")
    try:
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{source}: metadata 'model_kwargs' is not valid JSON ({err})") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"{source}: metadata 'model_kwargs' must be a JSON object, got {kwargs!r}")
    return name, kwargs


def create_model(name: str, kwargs: Optional[Dict[str, Any]] = None, *, meta: bool = False,
                 key: str = "model_kwargs") -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; a kwarg the model rejects (an unknown name, a bad connection kind or
    rate) is a :class:`UsageError` naming ``key``. ``meta`` builds on the meta device (no memory, for checks)."""
    import timm

    kwargs = dict(kwargs or {})
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, **kwargs)
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, KeyError) as err:  # KeyError: timm's layer lookup by name (act_layer='bogus')
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no kwargs"
        raise UsageError(f"model={name!r} cannot be built with {key} {given}: {_first_line(err)}") from None


def load_state_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, name: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after the family's key conversion (:func:`filter_checkpoint`);
    a misfit is a :class:`UsageError` naming ``source`` and ``name``."""
    try:
        model.load_state_dict(filter_checkpoint(state, model), strict=True)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{source} does not fit {name!r} ({_first_line(err)})") from None


def load_model(path: PathLike, model_name: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None, *,
               ema: bool = True, family: str = "", what: str = "timm model", finite: bool = True,
               ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild a registered model from a weights file (or run/checkpoint directory) in eval mode.

    The name and kwargs come from the file's metadata unless given; a file trained as another model is refused.
    Returns ``(model, info)`` with ``info = {"weights": path, "sha256": ..., "model": name, "model_kwargs": ...,
    "metadata": ...}``.
    """
    weights = resolve_weights(path, ema=ema)
    state, metadata = load_weights(weights, prefer_ema=ema)
    source = f"weights file {str(weights)!r}"
    recorded_name, recorded_kwargs = recorded_model(metadata, source)
    name = model_name or recorded_name
    if not name:
        raise UsageError(f"{source} does not record its model name; pass the model name explicitly")
    if recorded_name and model_name and recorded_name != model_name:
        raise UsageError(f"{source} holds weights of {recorded_name!r}, not {model_name!r}; pass the model "
                         f"{recorded_name!r} or another file")
    check_model_name(name, family, what)
    kwargs = recorded_kwargs if model_kwargs is None else dict(model_kwargs)
    model = create_model(name, kwargs, key=f"the model_kwargs of {source}")
    if finite:
        check_finite(state, source)
    load_state_into(model, state, source, name)
    model.eval().requires_grad_(False)
    info = {"weights": str(weights), "sha256": file_sha256(weights), "model": name, "model_kwargs": kwargs,
            "metadata": metadata}
    return model, info


def load_dinov2(path: PathLike, model_name: Optional[str] = None, model_kwargs: Optional[dict[str, Any]] = None, *,
                img_size: int = DINOV2_INPUT_SIZE, key: str = "dinov2_model") -> tuple[torch.nn.Module, str]:
    """A frozen DINOv2 ViT (or another timm ViT) for ``img_size`` inputs from a local weights file, without downloads;
    returns (model in eval mode, sha256). Used for FD-DINOv2 and as REPA's encoder; ``key`` names the option in
    errors. The file is read with :func:`hcvision.io.load_weights` (nothing unpickled) and must be finite."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    state, metadata = load_weights(path, what="DINOv2 weights")
    source = f"DINOv2 weights {str(path)!r}"
    check_finite(state, source)
    hint = f"pass {key}=NAME naming the timm ViT the file was saved from"
    patch = state.get("patch_embed.proj.weight")
    if patch is None or patch.ndim != 4 or patch.shape[1] != 3:  # before any image is seen: an RGB patch embedding
        found = "missing" if patch is None else f"{tuple(patch.shape)}"
        raise UsageError(f"{source} does not hold an RGB ViT feature extractor: first mismatched tensor "
                         f"patch_embed.proj.weight is {found}, expected (embed_dim, 3, patch, patch); {hint}")
    recorded_name, recorded_kwargs = recorded_model(metadata, source)
    name = model_name or recorded_name or DEFAULT_DINOV2_MODEL
    check_model_name(name.split(".")[0], "vit_", what="timm ViT for DINOv2 features", key=key)
    kwargs = {**(recorded_kwargs if model_kwargs is None else model_kwargs), "num_classes": 0, "img_size": img_size}
    model = create_model(name, kwargs, key=key)
    try:
        # converts the original DINOv2 layout (w12/w3, mask_token, register tokens) and resamples the position
        # embedding to the input grid; antialias=False as in DINOv2's interpolate_pos_encoding
        state = checkpoint_filter_fn(dict(state), model, interpolation="bicubic", antialias=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UsageError(f"{source} does not fit {name!r} ({_first_line(err)}); {hint}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the classifier is not used
    problem = layout_mismatch(state, model.state_dict())
    if problem:
        raise UsageError(f"{source} does not fit {name!r}: {problem}; {hint}")
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model, file_sha256(path)
