"""What a generative result was measured on: the fields that make two FID numbers comparable.

Published FIDs differ with the number of samples, the sampler and its steps (NFE), the guidance scale, interval and
channels, EMA or raw weights, the reference statistics and the extractor weights (DiT's own tracker: cfg 4.0 vs 1.5,
10K vs 50K, png vs jpg statistics, a JAX vs PyTorch Inception). :func:`provenance_fields` gives every producer of a
``results.json`` (training-time evaluation, the sampling CLI, the evaluation CLI) the same checked keys.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..cli import UsageError
from ..io import PathLike, file_sha256

__all__ = ["PROVENANCE_KEYS", "SAMPLING_KEYS", "input_sha256", "provenance_fields"]

# Sampling-side fields a results.json passes through (the evaluation CLI reads them from --provenance FILE).
SAMPLING_KEYS = ("objective", "sampler", "steps", "guidance_scale", "guidance_interval", "guidance_channels", "ema")
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


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{key}={value!r} is not valid; accepted: a finite number")
    return float(value)


def provenance_fields(
    *,
    num_samples: Optional[int] = None,
    objective: Optional[str] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    guidance_interval: Optional[Sequence[float]] = None,
    guidance_channels: Optional[int] = None,
    ema: Optional[bool] = None,
    reference: Optional[str] = None,
    reference_sha256: Optional[str] = None,
    extractors: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """The provenance keys of a generative ``results.json``, checked; arguments left ``None`` are left out.

    Args:
        num_samples: generated samples the metrics were computed on.
        objective: training objective of the model (e.g. ``"ddpm"``, ``"flow"``).
        sampler: e.g. ``"ddpm"``, ``"ddim"``, ``"euler"``; steps: its number of model evaluations per sample (NFE,
            not counting the doubled batch of classifier-free guidance).
        guidance_scale: classifier-free guidance scale (1 = none); guidance_interval: ``(lo, hi)`` range it is
            applied in (the sampler's time convention); guidance_channels: channels it is applied to (DiT: 3 of 4).
        ema: whether the EMA weights sampled.
        reference: name of the reference set or statistics; reference_sha256: :func:`input_sha256` of it.
        extractors: ``{extractor name: sha256 of its weights}`` for every feature set a metric used.
    """
    out: dict[str, Any] = {}
    if num_samples is not None:
        out["num_samples"] = _positive_int("num_samples", num_samples)
    for key, value in (("objective", objective), ("sampler", sampler), ("reference", reference)):
        if value is not None:
            if not isinstance(value, str) or not value:
                raise UsageError(f"{key}={value!r} is not valid; accepted: a non-empty string")
            out[key] = value
    if steps is not None:
        out["steps"] = _positive_int("steps", steps)
    if guidance_scale is not None:
        out["guidance_scale"] = _number("guidance_scale", guidance_scale)
    if guidance_interval is not None:
        if isinstance(guidance_interval, (str, bytes)) or len(guidance_interval) != 2:
            raise UsageError(f"guidance_interval={guidance_interval!r} is not valid; accepted: two numbers lo <= hi")
        lo, hi = (_number("guidance_interval", v) for v in guidance_interval)
        if lo > hi:
            raise UsageError(f"guidance_interval=({lo}, {hi}) is not valid; accepted: two numbers lo <= hi")
        out["guidance_interval"] = [lo, hi]
    if guidance_channels is not None:
        out["guidance_channels"] = _positive_int("guidance_channels", guidance_channels)
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
