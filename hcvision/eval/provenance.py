"""What a generative result was measured on: the fields that make two FID numbers comparable.

Published FIDs differ with the number of samples, the sampler and its steps (NFE), the guidance scale, interval and
channels (every sampling setting of :mod:`hcvision.sampling_spec`, under its one name), EMA or raw weights, the
reference statistics and the extractor weights (DiT's own tracker: cfg 4.0 vs 1.5, 10K vs 50K, png vs jpg statistics,
a JAX vs PyTorch Inception). :func:`provenance_fields` gives every producer of a
``results.json`` (training-time evaluation, the sampling CLI, the evaluation CLI) the same checked keys.
"""
from __future__ import annotations

import hashlib
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional

from ..cli import UsageError
from ..io import PathLike, file_sha256
from ..sampling_spec import check_setting, renamed, settings

__all__ = ["PROVENANCE_KEYS", "SAMPLING_KEYS", "SETTING_NAMES", "input_sha256", "provenance_fields"]

SETTING_NAMES = tuple(f.name for f in settings())
# Sampling-side fields a results.json passes through (the evaluation CLI reads them from --provenance FILE).
SAMPLING_KEYS = ("objective", *SETTING_NAMES, "ema")
PROVENANCE_KEYS = ("num_samples", *SAMPLING_KEYS, "reference", "reference_sha256", "extractors")


def input_sha256(path: PathLike) -> str:
    """SHA-256 of a file; for a folder, of its sorted (name, file SHA-256) list, so renaming or changing any image
    changes it."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.iterdir() if q.is_file()):
            h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
        return h.hexdigest()
    raise UsageError(f"{str(path)!r} does not exist; accepted: a file or a folder")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{key}={value!r} is not valid; accepted: an integer >= 1")
    return int(value)


def provenance_fields(
    *,
    num_samples: Optional[int] = None,
    objective: Optional[str] = None,
    sampling: Optional[Mapping[str, Any]] = None,
    ema: Optional[bool] = None,
    reference: Optional[str] = None,
    reference_sha256: Optional[str] = None,
    extractors: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """The provenance keys of a generative ``results.json``, checked; arguments left ``None`` are left out.

    Args:
        num_samples: generated samples the metrics were computed on.
        objective: training objective of the model (e.g. ``"ddpm"``, ``"flow"``).
        sampling: sampling settings by their :mod:`hcvision.sampling_spec` names (any subset: ``sampler``,
            ``sampling_steps``, ``guidance_scale``, ``guidance_interval``, ``guidance_channels`` (the channels
            guided), ``diffusion_norm``), each checked against its declared range; old names (``steps``,
            ``cfg_scale``, ``scheduler``) are accepted with a deprecation message.
        ema: whether the EMA weights sampled.
        reference: name of the reference set or statistics; reference_sha256: :func:`input_sha256` of it.
        extractors: ``{extractor name: sha256 of its weights}`` for every feature set a metric used.
    """
    out: dict[str, Any] = {}
    if num_samples is not None:
        out["num_samples"] = _positive_int("num_samples", num_samples)
    for key, value in (("objective", objective), ("reference", reference)):
        if value is not None:
            if not isinstance(value, str) or not value:
                raise UsageError(f"{key}={value!r} is not valid; accepted: a non-empty string")
            out[key] = value
    for key, value in (sampling or {}).items():
        name = renamed(key, "provenance")
        if name not in SETTING_NAMES:
            raise UsageError(f"sampling setting {key!r} is not known; accepted: {', '.join(SETTING_NAMES)}")
        value = check_setting(name, value)
        if name == "sampler" and not value:
            raise UsageError("sampler='' is not valid in a provenance record; accepted: the sampler that ran")
        out[name] = list(value) if isinstance(value, tuple) else value
    if ema is not None:
        if not isinstance(ema, bool):
            raise UsageError(f"ema={ema!r} is not valid; accepted: true or false")
        out["ema"] = ema
    if reference_sha256 is not None:
        if not (isinstance(reference_sha256, str) and len(reference_sha256) == 64):
            raise UsageError(f"reference_sha256={reference_sha256!r} is not valid; accepted: 64 hex digits")
        out["reference_sha256"] = reference_sha256
    if extractors is not None:
        out["extractors"] = {str(k): {"weights_sha256": str(v)} for k, v in extractors.items()}
    return out
