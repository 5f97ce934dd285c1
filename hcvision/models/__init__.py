"""Model families registered in timm on import."""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import dit, vit  # noqa: F401
from .convert import dit_checkpoint_filter_fn, vit_checkpoint_filter_fn
from .dit import DIT_MODEL_NAMES, HCDiT  # noqa: F401
from .hub import hub_model_args, save_pretrained  # noqa: F401
from .vit import VIT_MODEL_NAMES, HCVisionTransformer  # noqa: F401


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
