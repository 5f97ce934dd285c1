"""Feature extractors for generative metrics, registered with torch-fidelity.

Two extractors are registered on import:

``hcv-inception-v3-compat``
    torch-fidelity's TF-compatible InceptionV3 (the network behind FID/IS/KID, and behind ADM's
    precision/recall), but its weights are always loaded *safely* by hcvision: from a ``.safetensors``
    file or with ``torch.load(weights_only=True)`` (:func:`hcvision.io.load_weights`), then checked key by key,
    shape by shape and for NaN/Inf before torch-fidelity sees them. Besides torch-fidelity's features it provides
    ``'mixed_6/conv'``, the spatial features of ADM's sFID (see :data:`SPATIAL_FEATURE`). torch-fidelity's own loader
    calls ``torch.load(weights_only=False)``, which would run any pickle a user file contains. Weights come from, in
    order: the
    ``feature_extractor_weights_path`` argument, the ``HCV_INCEPTION_WEIGHTS`` environment variable,
    the torch hub cache / a download of torch-fidelity's official file.

``hcv-digits``
    a timm classifier for the 8x8 scikit-learn handwritten digits, loaded from a local safetensors file
    (argument, ``HCV_DIGITS_CLASSIFIER``, or ``weights/vit_digits_patch2_8_res.hcv_digits.safetensors``).
    Features are its pre-logits (FID/KID/precision/recall); its logits serve IS and class accuracy.
    Images are mapped to the classifier's input by :func:`digits_model_input`, which reproduces what
    ``train_cls.py`` feeds the classifier (``hcvision.data.DigitsDataset`` normalised by the model's cfg).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..cli import UsageError
from ..io import PathLike, check_finite, file_sha256, load_weights, read_metadata, save_safetensors
from ..models.loading import load_model

__all__ = [
    "DIGITS_CLASSIFIER_ENV",
    "DIGITS_EXTRACTOR",
    "DIGITS_IMAGE_SIZE",
    "DIGITS_MAX_VALUE",
    "DIGITS_MODEL_NAME_ENV",
    "DigitsFeatureExtractor",
    "INCEPTION_EXTRACTOR",
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_ENV",
    "PYTORCH_FID_INCEPTION_URL",
    "SPATIAL_CHANNELS",
    "SPATIAL_FEATURE",
    "SafeInceptionV3",
    "WeightsUnavailableError",
    "class_accuracy",
    "check_digits_classifier",
    "default_digits_classifier_path",
    "digits_model_input",
    "digits_preprocess",
    "digits_to_uint8",
    "inception_reference_shapes",
    "load_digits_classifier",
    "load_inception_state_dict",
    "save_digits_classifier",
    "validate_inception_state_dict",
]


INCEPTION_EXTRACTOR = "hcv-inception-v3-compat"
DIGITS_EXTRACTOR = "hcv-digits"
INCEPTION_WEIGHTS_ENV = "HCV_INCEPTION_WEIGHTS"
DIGITS_CLASSIFIER_ENV = "HCV_DIGITS_CLASSIFIER"
DIGITS_MODEL_NAME_ENV = "HCV_DIGITS_MODEL_NAME"
INCEPTION_URL = URL_INCEPTION_V3
# pytorch-fid publishes the same conversion of TF's inception-2015-12-05 graph (same hash prefix).
PYTORCH_FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)

DIGITS_IMAGE_SIZE = 8
DIGITS_MAX_VALUE = 16.0


# ADM's sFID (Nash et al. 2021, as computed by guided-diffusion's evaluator): the TF graph's ``mixed_6/conv:0``
# (the ReLU output of the 1x1 branch of the fourth 17x17 block, torch-fidelity's ``Mixed_6d.branch1x1``: TF's
# mixed_3 is Mixed_6a, mixed_6 is Mixed_6d), first 7 of its 192 channels, flattened in NHWC order: 17*17*7 = 2023.
SPATIAL_FEATURE = "mixed_6/conv"
SPATIAL_CHANNELS = 7


class WeightsUnavailableError(UsageError):
    """Feature-extractor weights were not given and could not be obtained (e.g. no network)."""


# --------------------------------------------------------------------------------------------------------------------
# InceptionV3
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def inception_reference_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes torch-fidelity's InceptionV3 expects.

    torch-fidelity builds its network inside a constructor that also loads weights, so the layout is taken
    from torchvision's InceptionV3 (1008 classes, no aux head), which uses the same module names and
    shapes; built on the meta device, so nothing is allocated.
    """
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def validate_inception_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise :class:`UsageError` unless ``state`` has exactly the InceptionV3 layout torch-fidelity expects.

    ``num_batches_tracked`` buffers may be absent (older checkpoints omit them; BatchNorm fills them in).
    """
    expected = inception_reference_shapes()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in state if k in expected
             and tuple(state[k].shape) != expected[k]]
    not_float = [k for k, v in state.items() if k in expected and not k.endswith("num_batches_tracked")
                 and not v.is_floating_point()]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", wrong), ("non-float tensors", not_float)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:4])})")
    if problems:
        raise UsageError(
            f"{source} is not a torch-fidelity/pytorch-fid InceptionV3 (pt_inception-2015-12-05) state dict: "
            + "; ".join(problems)
        )


def _offline_message(reason: str) -> str:
    return (
        f"InceptionV3 weights for FID/IS/precision/recall are not available: {reason}. Supply them with "
        f"weights_path=... (CLI: --inception-weights PATH) or the environment variable {INCEPTION_WEIGHTS_ENV}=PATH. "
        f"The official file (TF inception-2015-12-05 converted to PyTorch) is {INCEPTION_URL} "
        f"(identical to pytorch-fid's {PYTORCH_FID_INCEPTION_URL}); a .safetensors conversion of it works too."
    )


def load_inception_state_dict(
    weights_path: Optional[PathLike] = None, *, progress: bool = False
) -> tuple[dict[str, torch.Tensor], str, str]:
    """Resolve, safely load and validate InceptionV3 weights.

    Order: ``weights_path``, then ``$HCV_INCEPTION_WEIGHTS``, then the torch hub cache or a download of the
    official torch-fidelity file (hash-checked, loaded with ``weights_only=True``).

    Returns:
        (state_dict, sha256 of the file, human-readable source)
    Raises:
        WeightsUnavailableError: nothing given and the download failed (e.g. offline).
        UsageError: the file is corrupt, a foreign pickle, not an InceptionV3 state dict, or holds NaN/Inf.
    """
    path = weights_path if weights_path is not None else os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if path is not None:
        if not Path(path).is_file():
            raise WeightsUnavailableError(_offline_message(f"the file {str(path)!r} does not exist"))
        state, _ = load_weights(path, what="InceptionV3 weights")
        validate_inception_state_dict(state, source=repr(str(path)))
        check_finite(state, f"InceptionV3 weights {str(path)!r}")
        return state, file_sha256(path), str(path)

    file_name = os.path.basename(INCEPTION_URL)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        # torch.hub announces the download on stdout, which carries only results: show it on stderr when verbose
        with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
            state = torch.hub.load_state_dict_from_url(
                INCEPTION_URL, map_location="cpu", progress=progress, check_hash=True, weights_only=True
            )
    except (URLError, OSError, ConnectionError, TimeoutError) as e:
        raise WeightsUnavailableError(
            _offline_message(f"no weights path was given and downloading failed ({type(e).__name__}: {e})")
        ) from e
    except Exception as e:  # a cached file that is corrupt or not loadable with weights_only=True
        raise UsageError(f"could not load the cached InceptionV3 weights {str(cached)!r} safely "
                         f"({type(e).__name__}); delete it or pass --inception-weights PATH") from None
    if not isinstance(state, Mapping):
        raise UsageError(f"cached InceptionV3 weights {str(cached)!r} are not a state dict; delete the file")
    validate_inception_state_dict(state, source=repr(str(cached)))
    check_finite(state, f"InceptionV3 weights {str(cached)!r}")
    return dict(state), file_sha256(cached) if cached.is_file() else "", str(cached)


class SafeInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 with weights loaded and validated by :func:`load_inception_state_dict`.

    Same features as ``inception-v3-compat`` ('64', '192', '768', '2048', 'logits_unbiased', 'logits'), plus
    :data:`SPATIAL_FEATURE` (sFID's spatial features, (N, 2023) for the 17x17 grid).
    ``weights_sha256`` and ``weights_source`` record where the weights came from.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: Optional[PathLike] = None,
        feature_extractor_internal_dtype: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        state, sha, source = load_inception_state_dict(
            feature_extractor_weights_path, progress=bool(kwargs.get("verbose", False))
        )
        # The parent constructor builds the network and then calls torch.load(path, weights_only=False).
        # Handing it an in-memory buffer that we serialised ourselves from validated plain tensors is safe,
        # and it reuses torch-fidelity's exact architecture without copying it.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        del state
        super().__init__(
            name,
            features_list,
            feature_extractor_weights_path=buffer,
            feature_extractor_internal_dtype=feature_extractor_internal_dtype,
            **kwargs,
        )
        self.weights_sha256 = sha
        self.weights_source = source

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL_FEATURE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if SPATIAL_FEATURE not in self.features_list:
            return super().forward(x)
        # torch-fidelity's forward stops after the last feature it is asked for; '768' (after Mixed_6e) makes it run
        # through Mixed_6d, whose 1x1 branch a hook reads on the way.
        captured: list[torch.Tensor] = []

        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            # (N, 192, 17, 17) -> first 7 channels, NHWC order as ADM's `spatial[..., :7]` then reshape(N, -1)
            captured.append(out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(out.shape[0], -1).float())

        wanted = self.features_list
        others = [f for f in wanted if f != SPATIAL_FEATURE]
        handle = self.Mixed_6d.branch1x1.register_forward_hook(hook)
        # the parent must run at least through Mixed_6e ('768'), or the hook never fires
        self.features_list = others if set(others) - {"64", "192"} else [*others, "768"]
        try:
            out = dict(zip(self.features_list, super().forward(x)))
        finally:
            self.features_list = wanted
            handle.remove()
        out[SPATIAL_FEATURE] = captured[0]
        return tuple(out[f] for f in wanted)


# --------------------------------------------------------------------------------------------------------------------
# Digits classifier
# --------------------------------------------------------------------------------------------------------------------


def digits_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images (N, C, H, W), C in {1, 3}, to the digits classifier input.

    Convention (shared with ``hcvision.data``'s digits and the classifier training script):

    * sklearn's ``load_digits().images`` are 8x8 floats in 0..16 (0 = background, 16 = full ink);
    * as uint8 images they are stored as ``round(v * 255 / 16)`` (see :func:`digits_to_uint8`), i.e. light
      ink on a black background;
    * this function inverts that: RGB is averaged to gray, larger images are area-averaged down to 8x8
      (smaller ones bilinearly enlarged), and values are scaled by 16 / 255.

    Returns float32 (N, 1, 8, 8) in [0, 16] -- exactly the scale of ``load_digits().images``.
    """
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        raise UsageError(
            "digits_preprocess expects a uint8 tensor (N, C, H, W); got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[1] not in (1, 3):
        raise UsageError(
            f"digits_preprocess expects 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})"
        )
    x = images.float().mean(dim=1, keepdim=True)
    size = (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    if tuple(x.shape[-2:]) != size:
        if x.shape[-2] >= DIGITS_IMAGE_SIZE and x.shape[-1] >= DIGITS_IMAGE_SIZE:
            # Area averaging exactly undoes nearest-neighbour enlargement by an integer factor.
            x = F.adaptive_avg_pool2d(x, size)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x * (DIGITS_MAX_VALUE / 255.0)


def digits_model_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Classifier input for uint8 images: ``(digits_preprocess(images) / 16 - mean) / std``.

    This is the input ``train_cls.py`` trains on: ``hcvision.data.DigitsDataset`` scales sklearn's 0..16 values
    to [0, 1] and normalises them with the model's ``pretrained_cfg`` ``mean[0]`` / ``std[0]``.
    """
    return (digits_preprocess(images) / DIGITS_MAX_VALUE - mean) / std


def digits_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`digits_preprocess` for 8x8 digits: values in [0, 16] -> uint8 ``round(v * 255 / 16)``."""
    values = torch.as_tensor(values, dtype=torch.float32)
    return (values.clamp(0, DIGITS_MAX_VALUE) * (255.0 / DIGITS_MAX_VALUE)).round().to(torch.uint8)


def class_accuracy(logits: torch.Tensor, labels: Union[torch.Tensor, Any]) -> float:
    """Share of samples whose arg-max class equals the requested label."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).long()
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise UsageError(f"class_accuracy: logits (N, K) and labels (N,) expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise UsageError(f"class_accuracy: labels must lie in [0, {logits.shape[1] - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return float((logits.argmax(dim=1) == labels).double().mean())


DEFAULT_DIGITS_CLASSIFIER = "vit_digits_patch2_8_res.hcv_digits.safetensors"


def default_digits_classifier_path() -> Path:
    """``$HCV_DIGITS_CLASSIFIER``, else the project's residual digits ViT in ``weights/`` (``$HCV_WEIGHTS_DIR``).

    The residual classifier judges samples of every connection kind alike; ``train_cls.py`` writes the model name and
    its arguments into the file's metadata, so the extractor rebuilds it without being told.
    """
    env = os.environ.get(DIGITS_CLASSIFIER_ENV)
    if env:
        return Path(env)
    from ..resources import weights_dir

    return weights_dir() / DEFAULT_DIGITS_CLASSIFIER


def check_digits_classifier(path: PathLike = "") -> Path:
    """The digits classifier a run will score its samples with (``path``, else :func:`default_digits_classifier_path`),
    loaded once now so that a missing, damaged or foreign file is a :class:`UsageError` before training, not after."""
    path = Path(path) if path else default_digits_classifier_path()
    if not path.is_file():
        raise UsageError(
            f"the digits classifier {str(path)!r} does not exist; the demo scores its samples with it. Produce one "
            f"with the classification trainer (`hcv-train-cls --config digits_res output_dir=runs/clf` writes "
            f"runs/clf/model.safetensors) and pass digits_classifier=PATH or set "
            f"{DIGITS_CLASSIFIER_ENV}=PATH; or set eval_samples=0 to train without scoring")
    try:
        load_digits_classifier(path)
    except Exception as e:  # noqa: BLE001  (corrupt file, foreign model: any failure means it cannot score)
        raise UsageError(f"digits_classifier={str(path)!r} cannot be used: {e}") from None
    return path


def save_digits_classifier(
    model: torch.nn.Module, path: PathLike, model_name: str, model_kwargs: Optional[dict[str, Any]] = None
) -> Path:
    """Save a timm classifier so :func:`load_digits_classifier` can rebuild it.

    The safetensors metadata records the timm name under ``model`` and the JSON ``model_kwargs`` given to
    ``timm.create_model`` -- the same keys ``train_cls.py`` writes into its ``model.safetensors``.
    """
    import json

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"classifier path must end with .safetensors, got {str(path)!r}")
    metadata = {"model": model_name, "model_kwargs": json.dumps(model_kwargs or {})}
    return save_safetensors(model.state_dict(), path, metadata=metadata)


def load_digits_classifier(
    path: Optional[PathLike] = None,
    *,
    model_name: Optional[str] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> tuple[torch.nn.Module, str]:
    """Build the digits classifier from a local weights file; returns (model in eval mode, sha256).

    The model is rebuilt by :func:`hcvision.models.loading.load_model` from the name and kwargs recorded in the file's
    metadata (see :func:`save_digits_classifier`); ``model_name`` / ``model_kwargs`` override them, and
    ``$HCV_DIGITS_MODEL_NAME`` names the model when neither the argument nor the file does. NaN/Inf weights are
    refused.
    """
    path = Path(path) if path is not None else default_digits_classifier_path()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"digits classifier weights {str(path)!r} not found. Train one (it is written to weights/ by the "
            f"classifier training script) and pass its path as weights_path=... (CLI: --weights PATH) or set "
            f"{DIGITS_CLASSIFIER_ENV}=PATH"
        )
    name = model_name or os.environ.get(DIGITS_MODEL_NAME_ENV) or None
    meta = read_metadata(path)
    if name is None and not (meta.get("model") or meta.get("model_name")):
        raise UsageError(f"digits classifier {str(path)!r} does not record its timm model name; pass model_name=... "
                         f"(CLI: --model-name NAME) or set {DIGITS_MODEL_NAME_ENV}")
    model, info = load_model(path, name, model_kwargs, what="timm model for the digits classifier")
    return model, info["sha256"]


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around the hcvision digits classifier.

    Provided features: ``'prelogits'`` (FID, KID, precision/recall) and ``'logits'`` (IS, class accuracy).
    Input: uint8 (N, C, H, W), C in {1, 3}, any size; see :func:`digits_model_input` (mean/std come from the
    model's ``pretrained_cfg``, 0.5/0.5 if it has none, as in ``train_cls.py``).
    Extra keyword arguments: ``digits_model_name``, ``digits_model_kwargs`` (override the file metadata).
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: Optional[PathLike] = None,
        digits_model_name: Optional[str] = None,
        digits_model_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or default_digits_classifier_path()
        self.model, self.weights_sha256 = load_digits_classifier(
            path, model_name=digits_model_name, model_kwargs=digits_model_kwargs
        )
        self.weights_source = str(path)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean = float(cfg.get("mean", (0.5,))[0])
        self.std = float(cfg.get("std", (0.5,))[0])
        try:  # fail at construction, not mid-evaluation, if the model does not take 1x8x8 inputs
            with torch.no_grad():
                logits = self.model(torch.zeros(1, 1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE))
        except (RuntimeError, ValueError, AssertionError) as e:
            raise UsageError(f"digits classifier {str(path)!r} does not accept (N, 1, 8, 8) inputs "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if logits.dim() != 2:
            raise UsageError(f"digits classifier {str(path)!r} returns {tuple(logits.shape)}, expected (N, classes)")
        self.num_classes = logits.shape[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = digits_model_input(x, self.mean, self.std).to(next(self.model.parameters()).device)
        tokens = self.model.forward_features(x)
        out = {
            "prelogits": self.model.forward_head(tokens, pre_logits=True).float(),
            "logits": self.model.forward_head(tokens).float(),
        }
        return tuple(out[k] for k in self.features_list)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) for uint8 images (N, C, H, W)."""
        return self.model(digits_model_input(x, self.mean, self.std).to(next(self.model.parameters()).device)).float()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "prelogits", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "prelogits", "kid": "prelogits", "prc": "prelogits"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, dtype=torch.uint8)


def _register() -> None:
    for name, cls in ((INCEPTION_EXTRACTOR, SafeInceptionV3), (DIGITS_EXTRACTOR, DigitsFeatureExtractor)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:  # import twice (reload) must not fail
            register_feature_extractor(name, cls)


_register()
