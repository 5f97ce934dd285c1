"""The one sampling loop of hcvision: DDPM-family and flow-matching samplers, classifier-free guidance with an interval.

Every sampler is a small object with ``num_steps`` and ``step(denoise, x, i, generator) -> x``; :func:`sample` draws
the initial noise, builds the guided denoiser once and runs ``x = sampler.step(denoise, x, i, generator)`` for each
step. ``denoise(x, model_time, noise_level)`` calls the model (twice, batched, when guidance is active at that noise
level) and applies :func:`~hcvision.diffusion.guidance.guided_output`. Training-time evaluation, the sampling CLI and
the tests all go through :func:`sample`.

DDPM objective (DiT's schedule: 1000 linear betas 1e-4..0.02, no clipping), through diffusers schedulers:
  * ``"ddpm"``: ancestral sampling with the learned-range variance (iDDPM Eq. 15),
    ``DDPMScheduler(variance_type="learned_range", timestep_spacing="linspace")``. The linspace timesteps are DiT's
    respaced steps and diffusers' step uses ``beta' = 1 - abar_t / abar_prev``, DiT's respaced betas, so one step
    equals :meth:`GaussianDiffusion.p_sample` on the respaced chain (tested).
  * ``"ddim"``: deterministic DDIM (eta = 0, Song et al. 2021 Eq. 12) on epsilon; the variance channels are dropped.
    ``timestep_spacing="trailing"`` (starts at t = 999): diffusers' DDIM step takes the previous timestep as
    ``t - 1000 // num_steps``, which is consistent with its trailing grid when ``num_steps`` divides 1000, and off by
    at most one training step otherwise.
  * ``"dpmsolver++"``: multistep DPM-Solver++ (2nd order, Lu et al. 2022) on epsilon, linspace spacing.

Flow objective (:mod:`hcvision.diffusion.flow`: ``x_t = (1 - t) x_0 + t eps``, velocity ``v = eps - x_0``, model
called at ``999 t``), integrating from ``t = 1`` (noise) to ``t = 0`` (data):
  * ``"euler"``: the probability-flow ODE ``dx/dt = v`` with Euler steps on the uniform grid ``t_i = 1 - i / N``,
    through diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 1, our grid passed as ``sigmas``). N evaluations.
  * ``"heun"``: Heun's second-order method on the same grid, the last step (to ``t = 0``) Euler as in EDM
    (Karras et al. 2022, Alg. 1). ``2N - 1`` evaluations.
  * ``"sde"``: SiT's stochastic sampler (Ma et al. 2024, Sec. 2.4; the reverse-time SDE with the same marginals):
    ``dx = [v - (w_t / 2) s] dt + sqrt(w_t) dW`` run backwards with Euler-Maruyama, where the score follows from the
    velocity, ``s(x, t) = -(x + (1 - t) v) / t``, and the diffusion coefficient is SiT's ``w_t = norm * sigma_t =
    norm * t`` (SiT's default ``--diffusion-form sigma``, ``norm = 1``; REPA's sampler uses ``norm = 2``). Grid
    ``linspace(1, 0.04, N)`` then a last noise-free (mean) step to ``t = 0``, SiT's ``--last-step Mean
    --last-step-size 0.04``. N evaluations.

Classifier-free guidance (see :mod:`hcvision.diffusion.guidance`): conditional and unconditional (``null_class``)
inputs are batched into one forward pass at the same ``x_t``. One deliberate difference from DiT's ``sample.py``:
DiT diffuses the conditional and unconditional halves as two separate chains (each with its own noise), so its
unconditional prediction is evaluated at a different ``x_t``; here both are evaluated at the one chain's ``x_t``, as in
the CFG paper, diffusers' ``DiTPipeline``, SiT and REPA.

Randomness: ``generator`` is one ``torch.Generator`` or a list with one per row (diffusers' convention). With a list,
row ``i``'s initial noise and every later noise draw come from ``generator[i]`` only, so a row's sample does not depend
on the other rows (what :mod:`hcvision.sample` relies on for world-size-independent files).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..sampling_spec import DDPM_SAMPLERS, FLOW_SAMPLERS, SAMPLERS
from .guidance import Guidance, check_guidance_channels, guided_output

__all__ = [
    "DDPM_SAMPLERS", "FLOW_SAMPLERS", "SCHEDULERS", "SAMPLERS", "MODEL_TIME_SCALE", "DiffusersSampler",
    "FlowHeunSampler", "FlowSDESampler", "make_sampler", "make_scheduler", "objective_of", "sample",
]

SCHEDULERS = DDPM_SAMPLERS  # the DDPM family's names (kept under their historical name)
# Both objectives call the model with times in [0, 999]: DDPM's integer timesteps, and 999 t for flow time t, so the
# DiT timestep embedder sees one range and the guidance interval reads the same for both (noise level = time / 999).
MODEL_TIME_SCALE = 999.0

Generator = Union[torch.Generator, List[torch.Generator], None]
# denoise(x, model_time, noise_level) -> prediction channels (and the variance channels when a sampler asks for them)
Denoise = Callable[[Tensor, Tensor, float], Tensor]


def objective_of(sampler_name: str) -> str:
    """``"ddpm"`` or ``"flow"``: the objective a sampler name belongs to (ValueError listing all names)."""
    for objective, names in SAMPLERS.items():
        if sampler_name in names:
            return objective
    raise ValueError(f"unknown scheduler {sampler_name!r}; accepted: {', '.join(DDPM_SAMPLERS)} (ddpm objective), "
                     f"{', '.join(FLOW_SAMPLERS)} (flow objective)")


def make_scheduler(name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> SchedulerMixin:
    """A diffusers scheduler on DiT's training schedule. ``name`` is one of :data:`DDPM_SAMPLERS`."""
    common = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                  beta_schedule="linear", prediction_type="epsilon")
    if name == "ddpm":
        # clip_sample defaults to True in diffusers and would clip latents to [-1, 1]: DiT does not.
        return DDPMScheduler(**common, clip_sample=False, timestep_spacing="linspace", variance_type="learned_range")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           timestep_spacing="linspace")
    raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(DDPM_SAMPLERS)}")


# ------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------
class DiffusersSampler:
    """A configured diffusers scheduler as a sampler: one model call and one ``scheduler.step`` per step.

    For DDPM-family schedulers the timesteps are model times already. ``FlowMatchEulerDiscreteScheduler`` is set on
    the uniform grid ``sigma_i = 1 - i / N`` and the model is called at ``999 sigma_i``; its step only reads sigmas.
    """

    def __init__(self, scheduler: SchedulerMixin, num_steps: int, device: torch.device) -> None:
        self.scheduler = scheduler
        self.flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
        self.objective = "flow" if self.flow else "ddpm"
        num_train = int(scheduler.config.num_train_timesteps)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not (1 <= num_steps <= num_train):
            raise ValueError(f"num_steps must be an int in [1, {num_train}], got {num_steps!r}")
        if self.flow:  # its sigma is the flow time t (after its own shift, 1 by default)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist(), device=device)
            self.noise_levels = [float(s) for s in scheduler.sigmas[:-1].tolist()]
            self.model_times = scheduler.sigmas[:-1].to(torch.float32) * MODEL_TIME_SCALE
        else:
            scheduler.set_timesteps(num_steps, device=device)
            self.model_times = scheduler.timesteps
            self.noise_levels = [float(t) / MODEL_TIME_SCALE for t in scheduler.timesteps.tolist()]
        self.num_steps = len(scheduler.timesteps)
        self.nfe = self.num_steps
        # A learned-range DDPM step takes the variance channels too; every other scheduler the prediction only.
        learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
        self.full_output = isinstance(scheduler, DDPMScheduler) and learned
        if learned and not self.full_output:  # e.g. DPM-Solver: it would slice the output to [:, :3] (UnCLIP's case)
            raise ValueError(f"{type(scheduler).__name__} with variance_type={scheduler.config.variance_type!r} slices "
                             "the model output to 3 channels; build it without variance_type (dit_scheduler(cls) "
                             "does): it is given the prediction only")
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow-match: x_1 = eps

    def step(self, denoise: Denoise, x: Tensor, i: int, generator: Generator) -> Tensor:
        t = self.scheduler.timesteps[i]
        scale = getattr(self.scheduler, "scale_model_input", None)  # flow-match schedulers have none (identity)
        x_in = scale(x, t) if scale is not None else x
        out = denoise(x_in, self.model_times[i], self.noise_levels[i])
        return self.scheduler.step(out, t, x, generator=generator).prev_sample


class _FlowSampler:
    """Shared part of the flow samplers: a float64 grid of noise levels ``t_0 = 1 > ... > t_N = 0``."""

    objective = "flow"
    full_output = False
    init_noise_sigma = 1.0

    def __init__(self, grid: np.ndarray) -> None:
        self.grid = [float(v) for v in grid]
        self.num_steps = len(self.grid) - 1

    @staticmethod
    def model_time(t: float, x: Tensor) -> Tensor:
        return torch.tensor(t * MODEL_TIME_SCALE, device=x.device, dtype=torch.float32)


class FlowHeunSampler(_FlowSampler):
    """Heun's method for ``dx/dt = v(x, t)`` from t = 1 to 0 on a uniform grid; the last step is Euler (EDM Alg. 1)."""

    def __init__(self, num_steps: int) -> None:
        super().__init__(np.linspace(1.0, 0.0, num_steps + 1))
        self.nfe = 2 * num_steps - 1

    def step(self, denoise: Denoise, x: Tensor, i: int, generator: Generator) -> Tensor:
        t, t_next = self.grid[i], self.grid[i + 1]
        h = t_next - t  # negative: time runs from noise to data
        v = denoise(x, self.model_time(t, x), t)
        x_euler = x + h * v
        if t_next == 0.0:  # no evaluation at t = 0 (the velocity's 1/t terms of the score are not needed, but EDM's
            return x_euler  # rule keeps the NFE at 2N - 1 and matches SiT/REPA's Heun)
        v_next = denoise(x_euler, self.model_time(t_next, x), t_next)
        return x + 0.5 * h * (v + v_next)


class FlowSDESampler(_FlowSampler):
    """SiT's Euler-Maruyama sampler of the reverse SDE with diffusion ``w_t = norm * t`` and a final mean step.

    Reverse time (``h = t_next - t < 0``): ``x <- x + h [v - (w_t / 2) s] + sqrt(w_t |h|) z`` with the score
    ``s = -(x + (1 - t) v) / t`` of the linear interpolant; the last step (from ``last_step`` to 0) adds no noise.
    """

    def __init__(self, num_steps: int, diffusion_norm: float = 1.0, last_step: float = 0.04) -> None:
        if not 0.0 < last_step < 1.0:
            raise ValueError(f"last_step must be in (0, 1), got {last_step}")
        if not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
            raise ValueError(f"diffusion_norm must be a finite number >= 0, got {diffusion_norm}")
        grid = np.linspace(1.0, last_step, num_steps) if num_steps > 1 else np.array([1.0])
        super().__init__(np.append(grid, 0.0))
        self.diffusion_norm = float(diffusion_norm)
        self.nfe = num_steps

    def step(self, denoise: Denoise, x: Tensor, i: int, generator: Generator) -> Tensor:
        t, t_next = self.grid[i], self.grid[i + 1]
        h = t_next - t
        v = denoise(x, self.model_time(t, x), t)
        score = -(x + (1.0 - t) * v) / t  # E[eps | x_t] = x_t + (1 - t) v and s = -E[eps | x_t] / t
        w = self.diffusion_norm * t
        drift = v - 0.5 * w * score
        x_next = x + h * drift
        if t_next == 0.0:  # SiT's "Mean" last step
            return x_next
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x_next + math.sqrt(w * -h) * noise


Sampler = Union[DiffusersSampler, FlowHeunSampler, FlowSDESampler]


def make_sampler(scheduler: Union[str, SchedulerMixin], num_steps: int, device: Union[str, torch.device] = "cpu",
                 *, sde_diffusion_norm: float = 1.0, sde_last_step: float = 0.04) -> Sampler:
    """A sampler by name (:data:`DDPM_SAMPLERS` or :data:`FLOW_SAMPLERS`) or from a configured diffusers scheduler."""
    device = torch.device(device)
    if isinstance(scheduler, SchedulerMixin):
        return DiffusersSampler(scheduler, num_steps, device)
    if not isinstance(scheduler, str):
        raise ValueError(f"scheduler must be a sampler name or a diffusers scheduler, got {scheduler!r}")
    objective = objective_of(scheduler)
    if objective == "ddpm":
        return DiffusersSampler(make_scheduler(scheduler), num_steps, device)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if scheduler == "euler":
        # shift=1: no resolution shift of the grid; we pass our own uniform sigmas.
        return DiffusersSampler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), num_steps,
                                device)
    if scheduler == "heun":
        return FlowHeunSampler(num_steps)
    return FlowSDESampler(num_steps, diffusion_norm=sde_diffusion_norm, last_step=sde_last_step)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    shape: Sequence[int],
    y: Optional[Tensor] = None,
    *,
    scheduler: Union[str, SchedulerMixin, Sampler] = "ddpm",
    num_steps: int = 250,
    guidance_scale: float = 1.0,
    guidance_channels: Optional[int] = None,
    guidance_interval: Tuple[float, float] = (0.0, 1.0),
    null_class: Optional[int] = None,
    generator: Generator = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    objective: Optional[str] = None,
) -> Tensor:
    """Generate ``x_0`` of ``shape`` (B, C, ...) from pure noise.

    Args:
        model: ``model(x_t, t, y, **model_kwargs) -> (B, C or 2C, ...)`` (``y`` omitted when None); ``t`` holds model
            times in [0, 999] (int64 DDPM timesteps, float32 ``999 t`` for flow). The first ``C`` channels are the
            prediction (epsilon or velocity); DDPM's ``"ddpm"`` sampler needs the ``2C`` learned-range output.
        shape: output shape; B must match ``y``.
        y: class labels (B,), or None for an unconditional denoiser (then ``guidance_scale`` must be 1).
        scheduler: a name of :data:`DDPM_SAMPLERS` or :data:`FLOW_SAMPLERS`, a configured diffusers scheduler, or a
            sampler from :func:`make_sampler`.
        num_steps: sampling steps (DiT evaluates with 250 DDPM steps, SiT with 250 SDE steps); ignored for a sampler
            object.
        guidance_scale, guidance_channels, guidance_interval, null_class: classifier-free guidance, see
            :class:`~hcvision.diffusion.guidance.Guidance`.
        generator: one generator, or a list with one per row (per-row noise; see the module docstring).
        device: defaults to ``y``'s device, else CPU.
        objective: optional check that the sampler belongs to this objective (``"ddpm"`` or ``"flow"``).
        progress: show a tqdm bar.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, ...) with positive sizes, got {shape}")
    if device is None:
        device = y.device if y is not None else "cpu"
    device = torch.device(device)
    sampler = scheduler if isinstance(scheduler, (DiffusersSampler, _FlowSampler)) else \
        make_sampler(scheduler, num_steps, device)
    if objective is not None and objective != sampler.objective:
        raise ValueError(f"scheduler {scheduler!r} samples the {sampler.objective!r} objective, not {objective!r}; "
                         f"accepted for {objective!r}: {', '.join(SAMPLERS.get(objective, ()))}")
    batch, channels = shape[0], shape[1]
    check_guidance_channels(guidance_channels, channels)
    guidance = Guidance(guidance_scale, guidance_channels, guidance_interval, null_class)
    if y is not None and (y.ndim != 1 or y.shape[0] != batch):
        raise ValueError(f"y must have shape ({batch},) to match shape[0], got {tuple(y.shape)}")
    if guidance.enabled and y is None:
        raise ValueError(f"guidance_scale={guidance.scale} needs class labels y; pass guidance_scale=1.0 for an "
                         "unconditional denoiser")
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"a list of generators needs one per row ({batch}), got {len(generator)}")
    denoise = guided_denoiser(model, y, guidance, channels, shape, full_output=sampler.full_output,
                              model_kwargs=model_kwargs)
    x = randn_tensor(shape, generator=generator, device=device) * sampler.init_noise_sigma
    steps = range(sampler.num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"sampling ({type(sampler).__name__})")
    for i in steps:
        x = sampler.step(denoise, x, i, generator)
    return x


def guided_denoiser(model: Callable[..., Tensor], y: Optional[Tensor], guidance: Guidance, channels: int,
                    shape: Tuple[int, ...], *, full_output: bool = False,
                    model_kwargs: Optional[Dict[str, Any]] = None) -> Denoise:
    """``denoise(x, model_time, noise_level)``: the model's prediction at ``x``, guided where ``guidance`` is active.

    Returns the first ``C`` channels, or the whole output when ``full_output`` (DDPM's learned-range step).
    """
    kwargs = dict(model_kwargs or {})
    y_null = torch.full_like(y, guidance.null_class) if (guidance.enabled and y is not None) else None

    def denoise(x: Tensor, model_time: Tensor, noise_level: float) -> Tensor:
        use_cfg = guidance.active(noise_level)
        x_in = torch.cat([x, x]) if use_cfg else x
        y_in = torch.cat([y, y_null]) if use_cfg else y
        t_in = torch.as_tensor(model_time, device=x.device)
        t_in = (t_in.to(torch.int64) if not t_in.is_floating_point() else t_in).expand(x_in.shape[0])
        out = model(x_in, t_in, y_in, **kwargs) if y_in is not None else model(x_in, t_in, **kwargs)
        if out.shape[0] != x_in.shape[0] or out.shape[2:] != x_in.shape[2:] or \
                out.shape[1] not in ((2 * channels,) if full_output else (channels, 2 * channels)):
            want = "2C (epsilon and learned-range channels)" if full_output else "C or 2C (prediction first)"
            raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(x_in.shape)}; expected "
                             f"{want} channels, C = {channels}")
        if use_cfg:
            out = guided_output(*out.chunk(2), guidance.scale, guidance.channels, channels)
        return out if full_output else out[:, :channels]

    return denoise
