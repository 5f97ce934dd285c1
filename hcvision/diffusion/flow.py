"""Flow matching with SiT's linear interpolant and velocity prediction.

Convention (SiT paper, Ma et al. 2024, Eq. 1 and Sec. 2.2 with the "Linear" interpolant alpha_t = 1 - t,
sigma_t = t; REPA's ``path_type="linear"``; diffusers' flow-match schedulers with ``sigma = t``)::

    x_t = (1 - t) x_0 + t eps,        t in [0, 1], t = 0 data, t = 1 pure noise,
    v(x_t, t) = E[eps - x_0 | x_t] = d x_t / d t.

The model regresses ``eps - x_0`` (Eq. 6 of SiT: the velocity loss). Sampling integrates ``dx/dt = v`` from t = 1 to
t = 0 (see :mod:`hcvision.diffusion.sampling`). SiT's *code* runs time the other way (its ``ICPlan``:
``x_t = t x_1 + (1 - t) x_0`` with ``x_1`` the data and ``x_0`` the noise, target ``x_1 - x_0``); its time is
``1 - t`` here and its velocity ``-v``. The model is called at ``999 t`` (``MODEL_TIME_SCALE``), so the DiT timestep
embedder sees the same [0, 999] range as for DDPM (SiT feeds t in [0, 1] to the same embedder; converting a SiT
checkpoint would map times and negate the output).

Time sampling: ``"uniform"`` (SiT, REPA) draws ``t ~ U(0, 1)``; ``"logit_normal"`` draws
``t = sigmoid(n), n ~ N(logit_mean, logit_std^2)`` (Esser et al. 2024, "Scaling Rectified Flow Transformers",
Sec. 3.1; LightningDiT uses it with mean 0, std 1), which puts more training on intermediate noise levels.

If the model has learned-sigma output channels (``2C``), only the first ``C`` are used (as SiT does).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from .gaussian_diffusion import mean_flat
from .sampling import MODEL_TIME_SCALE

__all__ = ["FlowMatching", "TIME_SAMPLINGS", "interpolate", "target_velocity", "velocity_to_score"]

TIME_SAMPLINGS = ("uniform", "logit_normal")


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.to(dtype=torch.promote_types(like.dtype, torch.float32), device=like.device).reshape(
        -1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x_0 + t eps`` (per-sample ``t`` of shape (B,))."""
    t = _bcast(t, x0)
    return (1.0 - t) * x0 + t * noise


def target_velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """``d x_t / d t = eps - x_0``: the regression target of the linear interpolant."""
    return noise - x0


def velocity_to_score(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Score ``grad log p_t(x_t) = -E[eps | x_t] / t`` with ``E[eps | x_t] = x_t + (1 - t) v`` (linear interpolant)."""
    t = _bcast(t, x_t)
    return -(x_t + (1.0 - t) * v) / t


class FlowMatching:
    """SiT's flow-matching objective: linear interpolant, velocity MSE, uniform or logit-normal time.

    Args:
        time_sampling: ``"uniform"`` or ``"logit_normal"``.
        logit_mean, logit_std: parameters of the logit-normal law (SD3/LightningDiT: 0 and 1).
        eps: times are kept in ``[eps, 1 - eps]`` so the model never sees the exact end points it is never asked
            about at sampling time (``t = 0``) and the score stays finite (``t > 0``); SiT's train_eps plays this role.
    """

    objective = "flow"

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 eps: float = 1e-5) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling={time_sampling!r} is not valid; accepted: {', '.join(TIME_SAMPLINGS)}")
        if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std > 0):
            raise ValueError(f"logit_mean must be finite and logit_std > 0, got {logit_mean}, {logit_std}")
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")
        self.time_sampling, self.logit_mean, self.logit_std, self.eps = time_sampling, logit_mean, logit_std, eps

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None,
                         device: Optional[torch.device] = None) -> Tensor:
        """Per-sample flow times ``t`` (float32, shape (B,)) from the configured law."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if device is None:
            device = generator.device if generator is not None else "cpu"
        if self.time_sampling == "uniform":
            t = torch.rand(batch_size, generator=generator, device=device)
        else:
            n = torch.randn(batch_size, generator=generator, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return t.clamp(self.eps, 1.0 - self.eps)

    @staticmethod
    def model_time(t: Tensor) -> Tensor:
        """The time the model is called with: ``999 t`` (see the module docstring)."""
        return t * MODEL_TIME_SCALE

    def training_losses(self, model: Callable[..., Tensor], x_start: Tensor, t: Tensor, y: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None,
                        model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Tensor]:
        """Per-sample velocity MSE ``|v_theta(x_t, t) - (eps - x_0)|^2`` (mean over dimensions; SiT Eq. 6).

        Calls ``model(x_t, 999 t, y, **model_kwargs)`` (``y`` omitted when None). Returns ``{"loss", "mse"}``.
        """
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != x_start.shape[0] or not t.is_floating_point():
            raise ValueError(f"t must be a 1-D float tensor of flow times, one per sample ({x_start.shape[0]}), got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"flow times must lie in [0, 1], got values in [{float(t.min())}, {float(t.max())}]")
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x_start shape {tuple(x_start.shape)}")
        x_t = interpolate(x_start, noise, t)
        kwargs = dict(model_kwargs or {})
        model_t = self.model_time(t.to(x_start.device))
        out = model(x_t, model_t, y, **kwargs) if y is not None else model(x_t, model_t, **kwargs)
        channels = x_start.shape[1]
        if out.shape[0] != x_start.shape[0] or out.shape[2:] != x_start.shape[2:] \
                or out.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"model output shape {tuple(out.shape)} must be (B, C or 2C, ...) for input shape "
                             f"{tuple(x_start.shape)}")
        mse = mean_flat((out[:, :channels] - target_velocity(x_start, noise)) ** 2)
        return {"loss": mse, "mse": mse}
