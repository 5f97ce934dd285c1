"""Model families registered in timm on import."""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import dit, vit  # noqa: F401
from .dit import DIT_MODEL_NAMES, HCDiT  # noqa: F401
from .vit import VIT_MODEL_NAMES, HCVisionTransformer  # noqa: F401


def filter_checkpoint(state_dict: Dict[str, Any], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict in any layout a family accepts (hcvision, timm/official, diffusers) -> ``model``'s own."""
    if isinstance(model, HCDiT):
        return dit.checkpoint_filter_fn(state_dict, model)
    if isinstance(model, HCVisionTransformer):
        return vit.checkpoint_filter_fn(state_dict, model)
    return dict(state_dict)
