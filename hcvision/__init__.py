"""hcvision: Hyper-Connection, Frac-Connection and mHC backbones for vision, registered in timm.

``import hcvision`` registers the model families with timm, so ``timm.create_model("vit_base_patch16_224_dhc2")`` works.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import connections, models  # noqa: F401  (importing models registers the families with timm)
