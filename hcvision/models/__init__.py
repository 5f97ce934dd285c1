"""Model families registered in timm on import."""
from __future__ import annotations

from . import dit, vit  # noqa: F401
from .dit import DIT_MODEL_NAMES, HCDiT  # noqa: F401
from .hub import hub_model_args, save_pretrained  # noqa: F401
from .loading import filter_checkpoint, load_model  # noqa: F401
from .vit import VIT_MODEL_NAMES, HCVisionTransformer  # noqa: F401

