"""The training objective as a choice, and what a weights file records about it.

``make_objective("ddpm")`` is DiT's :class:`~hcvision.diffusion.GaussianDiffusion` (epsilon prediction, learned sigma,
hybrid loss), unchanged; ``make_objective("flow", time_sampling=...)`` is SiT's linear-interpolant flow matching
(:class:`~hcvision.diffusion.flow.FlowMatching`). Both expose the same two calls a trainer needs::

    objective = make_objective(cfg.objective, time_sampling=cfg.time_sampling)
    t = objective.sample_timesteps(x.shape[0], device=x.device)
    loss = objective.training_losses(model, x, t, y=y)["loss"].mean()

A model file records its objective and its sampling defaults as string metadata (safetensors), so sampling picks the
right path without being told (:func:`sampling_metadata` writes, :func:`read_sampling_metadata` reads). Files
without the keys are DDPM files (everything trained before the flow objective existed).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..cli import UsageError
from .flow import TIME_SAMPLINGS, FlowMatching
from .gaussian_diffusion import GaussianDiffusion
from .sampling import SAMPLERS, objective_of

__all__ = ["OBJECTIVES", "DEFAULT_SAMPLER", "METADATA_KEYS", "make_objective", "sampling_metadata",
           "read_sampling_metadata"]

OBJECTIVES: Tuple[str, ...] = ("ddpm", "flow")
# DiT evaluates with 250 ancestral DDPM steps; SiT's and REPA's headline FIDs use the 250-step SDE sampler.
DEFAULT_SAMPLER: Dict[str, str] = {"ddpm": "ddpm", "flow": "sde"}
METADATA_KEYS: Tuple[str, ...] = ("objective", "time_sampling", "sampler", "sampling_steps", "cfg_scale",
                                  "guidance_channels", "guidance_interval")


def make_objective(objective: str = "ddpm", **options: Any) -> Union[GaussianDiffusion, FlowMatching]:
    """``"ddpm"`` -> :class:`GaussianDiffusion` (no options); ``"flow"`` -> :class:`FlowMatching` (``time_sampling``,
    ``logit_mean``, ``logit_std``). ValueError names the bad value and what is accepted."""
    if objective == "ddpm":
        extra = {k: v for k, v in options.items() if v is not None and k != "time_sampling"}
        if extra or options.get("time_sampling") not in (None, "uniform"):
            raise ValueError(f"objective='ddpm' trains at uniform integer timesteps and takes no options; got "
                             f"{ {k: v for k, v in options.items() if v is not None} } (these belong to "
                             "objective='flow')")
        return GaussianDiffusion()
    if objective == "flow":
        return FlowMatching(**{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"objective={objective!r} is not valid; accepted: {', '.join(OBJECTIVES)}")


def sampling_metadata(objective: str, *, time_sampling: Optional[str] = None, sampler: Optional[str] = None,
                      steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                      guidance_channels: Optional[int] = None,
                      guidance_interval: Optional[Sequence[float]] = None) -> Dict[str, str]:
    """String metadata for ``hcvision.io.save_safetensors(..., metadata=...)``: the objective and sampling defaults.

    Keys (all strings): ``objective`` (``ddpm``/``flow``), ``time_sampling``, ``sampler``, ``sampling_steps``,
    ``cfg_scale``, ``guidance_channels`` (``""`` = automatic: 3 of 4 latent channels, else all) and
    ``guidance_interval`` (JSON ``[lo, hi]``). Keys given as None are left out.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not valid; accepted: {', '.join(OBJECTIVES)}")
    if sampler is not None and objective_of(sampler) != objective:
        raise ValueError(f"sampler={sampler!r} does not sample objective={objective!r}; accepted: "
                         f"{', '.join(SAMPLERS[objective])}")
    meta = {"objective": objective}
    if time_sampling is not None:
        meta["time_sampling"] = str(time_sampling)
    if sampler is not None:
        meta["sampler"] = sampler
    if steps is not None:
        meta["sampling_steps"] = str(int(steps))
    if cfg_scale is not None:
        meta["cfg_scale"] = repr(float(cfg_scale))
    if guidance_channels is not None:
        meta["guidance_channels"] = str(int(guidance_channels)) if guidance_channels else ""
    if guidance_interval is not None:
        meta["guidance_interval"] = json.dumps([float(v) for v in guidance_interval])
    return meta


def read_sampling_metadata(metadata: Mapping[str, str], source: str = "weights file") -> Dict[str, Any]:
    """The objective and sampling defaults recorded in ``metadata`` (``{}`` entries absent -> None).

    ``objective`` is ``"ddpm"`` when the file does not record one. Malformed values raise :class:`UsageError`
    naming ``source`` and the key.
    """
    def bad(key: str, accepted: str) -> UsageError:
        return UsageError(f"{source}: metadata {key}={metadata[key]!r} is not valid; accepted: {accepted}")

    out: Dict[str, Any] = {"objective": metadata.get("objective", "ddpm"), "time_sampling": None, "sampler": None,
                           "steps": None, "cfg_scale": None, "guidance_channels": None, "guidance_interval": None}
    if out["objective"] not in OBJECTIVES:
        raise bad("objective", ", ".join(OBJECTIVES))
    out["time_sampling"] = metadata.get("time_sampling")
    if "sampler" in metadata:
        if metadata["sampler"] not in SAMPLERS[out["objective"]]:
            raise bad("sampler", ", ".join(SAMPLERS[out["objective"]]))
        out["sampler"] = metadata["sampler"]
    if "sampling_steps" in metadata:
        try:
            out["steps"] = int(metadata["sampling_steps"])
        except ValueError:
            raise bad("sampling_steps", "an integer >= 1") from None
        if out["steps"] < 1:
            raise bad("sampling_steps", "an integer >= 1")
    if "cfg_scale" in metadata:
        try:
            out["cfg_scale"] = float(metadata["cfg_scale"])
        except ValueError:
            raise bad("cfg_scale", "a number >= 0") from None
        if not (math.isfinite(out["cfg_scale"]) and out["cfg_scale"] >= 0):
            raise bad("cfg_scale", "a number >= 0")
    if metadata.get("guidance_channels"):
        try:
            out["guidance_channels"] = int(metadata["guidance_channels"])
        except ValueError:
            raise bad("guidance_channels", "'' (automatic) or an integer >= 1") from None
    if "guidance_interval" in metadata:
        try:
            lo, hi = (float(v) for v in json.loads(metadata["guidance_interval"]))
        except (ValueError, TypeError):
            raise bad("guidance_interval", "a JSON list [lo, hi] with 0 <= lo <= hi <= 1") from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise bad("guidance_interval", "a JSON list [lo, hi] with 0 <= lo <= hi <= 1")
        out["guidance_interval"] = (lo, hi)
    return out
