"""DINOv2 features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics").

FD-DINOv2 is the Fréchet distance (the FID formula) on the CLS embedding of a DINOv2 ViT instead of Inception's pool
features. This module follows dgm-eval, the paper's reference code:

* input: each uint8 image resized to 224x224 with PIL's bicubic filter, scaled to [0, 1] and normalised with the
  ImageNet mean and std (:func:`dinov2_preprocess`);
* network: DINOv2 ViT-L/14 (``vit_large_patch14_dinov2.lvd142m`` in timm, the original ``dinov2_vitl14`` weights);
  feature = the final-norm CLS token (``model(x)`` with the classifier removed), 1024 dims.

Weights are never downloaded: they come from a local file (``dinov2_weights=PATH``, CLI ``--dinov2-weights``, or
``$HCV_DINOV2_WEIGHTS``) in timm's or the original DINOv2 layout, loaded without unpickling
(:func:`hcvision.io.load_weights`) and checked for NaN/Inf. The position embedding (37x37 for 518 px) is resampled once
to the 16x16 grid of 224 px, bicubic without antialiasing as DINOv2's own forward does (which also adds a 0.1 offset to
the scale factor: a difference in the last digits of the embedding, not in the definition of the metric). A file whose
safetensors metadata records ``model`` / ``model_kwargs`` (what hcvision's trainers and the tests write) is rebuilt as
that model; otherwise ``dinov2_model`` names it.

Registered with torch-fidelity as ``hcv-dinov2`` (feature ``'cls'``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..cli import UsageError
from ..io import (PathLike, check_finite, check_model_name, file_sha256, layout_mismatch, load_weights,
                  recorded_model)

__all__ = [
    "DEFAULT_DINOV2_MODEL",
    "DINOV2_EXTRACTOR",
    "DINOV2_INPUT_SIZE",
    "DINOV2_WEIGHTS_ENV",
    "DinoV2FeatureExtractor",
    "dinov2_preprocess",
    "load_dinov2",
    "resolve_dinov2_weights",
]

DINOV2_EXTRACTOR = "hcv-dinov2"
DINOV2_WEIGHTS_ENV = "HCV_DINOV2_WEIGHTS"
DEFAULT_DINOV2_MODEL = "vit_large_patch14_dinov2.lvd142m"
DINOV2_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_dinov2_weights(path: Optional[PathLike]) -> Path:
    """``path``, else ``$HCV_DINOV2_WEIGHTS``; a one-line error naming both when neither gives an existing file."""
    chosen = path if path is not None else os.environ.get(DINOV2_WEIGHTS_ENV) or None
    if chosen is None:
        raise UsageError(f"FD-DINOv2 needs local DINOv2 weights: pass dinov2_weights=PATH (CLI: --dinov2-weights PATH) "
                         f"or set {DINOV2_WEIGHTS_ENV}=PATH (a timm or original DINOv2 ViT-L/14 state dict, "
                         ".safetensors or .pth); nothing is downloaded")
    if not Path(chosen).is_file():
        raise UsageError(f"DINOv2 weights file {str(chosen)!r} does not exist; pass --dinov2-weights PATH or set "
                         f"{DINOV2_WEIGHTS_ENV}=PATH")
    return Path(chosen)


def load_dinov2(path: PathLike, model_name: Optional[str] = None, model_kwargs: Optional[dict[str, Any]] = None, *,
                img_size: int = DINOV2_INPUT_SIZE, key: str = "dinov2_model") -> tuple[torch.nn.Module, str]:
    """A frozen DINOv2 ViT (or another timm ViT) for ``img_size`` inputs from a local weights file, without downloads;
    returns (model in eval mode, sha256). Used for FD-DINOv2 and as REPA's encoder; ``key`` names the option in
    errors. The file is read with :func:`hcvision.io.load_weights` (nothing unpickled) and must be finite."""
    import timm
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
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {name!r} with {kwargs} for {source} ({err})") from None
    try:
        # converts the original DINOv2 layout (w12/w3, mask_token, register tokens) and resamples the position
        # embedding to the input grid; antialias=False as in DINOv2's interpolate_pos_encoding
        state = checkpoint_filter_fn(dict(state), model, interpolation="bicubic", antialias=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UsageError(f"{source} does not fit {name!r} ({first}); {hint}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the classifier is not used
    problem = layout_mismatch(state, model.state_dict())
    if problem:
        raise UsageError(f"{source} does not fit {name!r}: {problem}; {hint}")
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model, file_sha256(path)


def dinov2_preprocess(images: torch.Tensor) -> torch.Tensor:
    """dgm-eval's DINOv2 input: uint8 (N, C, H, W), C in {1, 3} -> float32 (N, 3, 224, 224).

    Each image is resized to 224x224 by PIL's bicubic filter on its uint8 pixels (torchvision's ``Resize`` on a PIL
    image, as dgm-eval does), scaled to [0, 1] and normalised with the ImageNet mean and std.
    """
    from PIL import Image

    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"dinov2_preprocess expects uint8 (N, C, H, W) with C in (1, 3), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    size = (DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE)
    out = np.empty((images.shape[0], *size, 3), dtype=np.uint8)
    for i, img in enumerate(images.cpu().expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.Resampling.BICUBIC))
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2FeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: the DINOv2 CLS embedding (``'cls'``) of uint8 images (N, C, H, W).

    Extra keyword arguments: ``dinov2_model``, ``dinov2_model_kwargs`` (override the file metadata).
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: Optional[PathLike] = None,
                 dinov2_model: Optional[str] = None, dinov2_model_kwargs: Optional[dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        super().__init__(name, features_list)
        path = resolve_dinov2_weights(feature_extractor_weights_path)
        self.model, self.weights_sha256 = load_dinov2(path, dinov2_model, dinov2_model_kwargs)
        self.weights_source = str(path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = next(self.model.parameters()).device
        feats = self.model(dinov2_preprocess(x).to(device)).float()
        return tuple(feats for _ in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("cls",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "cls", "kid": "cls", "prc": "cls"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE, dtype=torch.uint8)


if DINOV2_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # a reload must not fail
    register_feature_extractor(DINOV2_EXTRACTOR, DinoV2FeatureExtractor)
