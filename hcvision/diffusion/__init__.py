"""Diffusion objectives (DiT's DDPM, SiT's flow matching), the one sampling loop and the one guidance function.

A denoiser is any callable ``model(x_t, t, y) -> out``; nothing here depends on the model class. ``t`` holds model
times in [0, 999] for both objectives. DDPM outputs ``2 * C`` channels (epsilon, then DiT's learned-range variance
value); flow outputs the velocity in its first ``C`` channels.

Training, either objective (DDPM: uniform integer t, hybrid loss = eps MSE + VLB with a stop-gradient on the mean;
flow: x_t = (1 - t) x_0 + t eps, velocity MSE, uniform or logit-normal t)::

    from hcvision.diffusion import make_objective
    objective = make_objective("flow", time_sampling="logit_normal")     # or make_objective("ddpm")
    t = objective.sample_timesteps(x0.shape[0], device=x0.device)
    loss = objective.training_losses(model, x0, t, y=labels)["loss"].mean()

Sampling (DiT's evaluation: 250 DDPM steps, cfg 1.5 on the first 3 latent channels; REPA's: 250 SDE steps, cfg 1.8
on t in [0, 0.7])::

    from hcvision.diffusion import sample
    latents = sample(model, (8, 4, 32, 32), y=labels, scheduler="ddpm", num_steps=250,
                     guidance_scale=1.5, guidance_channels=3, null_class=1000,
                     generator=torch.Generator().manual_seed(0))
    latents = sample(model, (8, 4, 32, 32), y=labels, scheduler="sde", num_steps=250,
                     guidance_scale=1.8, guidance_interval=(0.0, 0.7), null_class=1000)

``scheduler`` is ``"ddpm"``, ``"ddim"`` or ``"dpmsolver++"`` for DDPM models and ``"euler"``, ``"heun"`` or ``"sde"``
for flow models (see :mod:`hcvision.diffusion.sampling`). ``GaussianDiffusion(use_timesteps=space_timesteps(1000,
250)).p_sample`` is our own respaced ancestral step; it matches diffusers' ``DDPMScheduler.step`` (tested).
REPA (representation alignment) is :mod:`hcvision.diffusion.repa`; :class:`DiffusionLoss` is the trainer's loss
(objective + optional REPA term, all-reduced value).
"""
from ..sampling_spec import DEFAULT_SAMPLER, SamplingSpec
from .flow import TIME_SAMPLINGS, FlowMatching, interpolate, target_velocity, velocity_to_score
from .gaussian_diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    mean_flat,
    normal_kl,
    space_timesteps,
)
from .guidance import Guidance, guided_output
from .loss import DiffusionLoss
from .objectives import (
    METADATA_KEYS,
    OBJECTIVES,
    make_objective,
    read_sampling_metadata,
    sampling_metadata,
)
from .sampling import (
    DDPM_SAMPLERS,
    FLOW_SAMPLERS,
    SAMPLERS,
    SCHEDULERS,
    make_sampler,
    make_scheduler,
    objective_of,
    sample,
)

__all__ = [
    "DDPM_SAMPLERS",
    "DEFAULT_SAMPLER",
    "DiffusionLoss",
    "SamplingSpec",
    "FlowMatching",
    "METADATA_KEYS",
    "OBJECTIVES",
    "TIME_SAMPLINGS",
    "interpolate",
    "make_objective",
    "read_sampling_metadata",
    "sampling_metadata",
    "target_velocity",
    "velocity_to_score",
    "FLOW_SAMPLERS",
    "GaussianDiffusion",
    "Guidance",
    "SAMPLERS",
    "SCHEDULERS",
    "discretized_gaussian_log_likelihood",
    "guided_output",
    "linear_beta_schedule",
    "make_sampler",
    "make_scheduler",
    "mean_flat",
    "normal_kl",
    "objective_of",
    "sample",
    "space_timesteps",
]
