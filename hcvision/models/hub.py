"""Hugging Face Hub format for every hcvision model, through timm's own hub helpers.

:func:`save_pretrained` writes what ``timm.models.save_for_hf`` writes, ``model.safetensors`` plus ``config.json``
(``architecture``, ``num_classes``, ``pretrained_cfg`` and ``model_args``), with :func:`hub_model_args` added to
``model_args``: the connection kind, the rate, the connection options and, for DiT, the numerics. Rebuilding needs
the architecture registered, so import hcvision first::

    import hcvision, timm
    hcvision.models.save_pretrained(model, "exported/")
    same = timm.create_model("local-dir:exported/", pretrained=True)     # identical weights and outputs

Publishing uses timm's uploader with the same arguments::

    timm.models.push_to_hf_hub(model, "user/name", model_args=hcvision.models.hub_model_args(model),
                               safe_serialization=True)
    timm.create_model("hf-hub:user/name", pretrained=True)               # after `import hcvision`
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..io import PathLike, atomic_write
from .dit import HCDiT
from .vit import HCVisionTransformer

__all__ = ["hub_model_args", "save_pretrained"]


def hub_model_args(model: torch.nn.Module) -> Dict[str, Any]:
    """The hcvision constructor arguments that config.json's ``model_args`` must hold to rebuild ``model``."""
    if not isinstance(model, (HCVisionTransformer, HCDiT)):
        raise ValueError(f"hub_model_args takes an hcvision model (HCVisionTransformer or HCDiT), got "
                         f"{type(model).__name__}")
    args: Dict[str, Any] = {"connection": model.connection, "rate": model.rate}
    if model.connection_options:
        args["connection_options"] = dict(model.connection_options)
    if isinstance(model, HCDiT):
        args["numerics"] = model.numerics
    return args


def save_pretrained(model: torch.nn.Module, save_directory: PathLike, *, model_config: Optional[dict] = None,
                    model_args: Optional[dict] = None, data_config: Optional[dict] = None) -> Path:
    """Export ``model`` (built with ``timm.create_model``) to ``save_directory`` in timm's Hub format.

    ``model_config``, ``model_args`` (merged over :func:`hub_model_args`) and ``data_config`` are passed on to
    ``timm.models.save_for_hf``. Each file is moved into place whole (weights first, config.json last), so a reader
    never sees half a file. Returns the directory.
    """
    from timm.models import save_for_hf

    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture:
        raise ValueError(f"save_pretrained needs a model built with timm.create_model (it records the architecture "
                         f"name in pretrained_cfg); got a {type(model).__name__} without one")
    args = dict(hub_model_args(model), **(model_args or {}))
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export.") as tmp:
        save_for_hf(model, tmp, model_config=model_config, model_args=args, safe_serialization=True,
                    data_config=data_config)
        written = sorted(Path(tmp).iterdir(), key=lambda p: p.name == "config.json")
        for src in written:
            atomic_write(out / src.name, lambda dest, src=src: shutil.copyfile(src, dest))
    return out
