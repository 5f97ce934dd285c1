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

from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..cli import UsageError
from ..sampling_spec import SAMPLERS, SamplingSpec, read_settings, settings
from .flow import FlowMatching
from .gaussian_diffusion import GaussianDiffusion

__all__ = ["OBJECTIVES", "METADATA_KEYS", "make_objective", "sampling_metadata", "read_sampling_metadata"]

OBJECTIVES: Tuple[str, ...] = tuple(SAMPLERS)  # ("ddpm", "flow")
METADATA_KEYS: Tuple[str, ...] = ("objective", "time_sampling", *(f.name for f in settings()))


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


def sampling_metadata(objective: str, spec: SamplingSpec = SamplingSpec(), *,
                      time_sampling: Optional[str] = None) -> Dict[str, str]:
    """String metadata for ``hcvision.io.save_safetensors(..., metadata=...)``: the objective, its ``time_sampling``
    (flow) and every sampling setting of ``spec`` (:meth:`SamplingSpec.to_metadata`; sampler '' becomes the
    objective's default). A sampler of another objective is a :class:`UsageError`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not valid; accepted: {', '.join(OBJECTIVES)}")
    meta = {"objective": objective, **spec.for_objective(objective).to_metadata()}
    if time_sampling is not None:
        meta["time_sampling"] = str(time_sampling)
    return meta


def read_sampling_metadata(metadata: Mapping[str, str], source: str = "weights file") -> Dict[str, Any]:
    """``{"objective", "time_sampling", "settings"}`` recorded in ``metadata``: ``settings`` holds the sampling
    settings the file records (:func:`hcvision.sampling_spec.read_settings`; old files: ``cfg_scale``).

    ``objective`` is ``"ddpm"`` when the file does not record one. Malformed values raise :class:`UsageError`
    naming ``source`` and the key.
    """
    objective = metadata.get("objective", "ddpm")
    if objective not in OBJECTIVES:
        raise UsageError(f"{source}: metadata objective={objective!r} is not valid; accepted: {', '.join(OBJECTIVES)}")
    settings = read_settings(metadata, source)
    if settings.get("sampler") and settings["sampler"] not in SAMPLERS[objective]:
        raise UsageError(f"{source}: metadata sampler={settings['sampler']!r} is not valid; accepted: "
                         f"{', '.join(SAMPLERS[objective])}")
    return {"objective": objective, "time_sampling": metadata.get("time_sampling"), "settings": settings}
