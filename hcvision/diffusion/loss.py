"""The training loss of a diffusion run: the objective's loss, plus REPA's alignment term when the model has one.

    loss_fn = DiffusionLoss(accelerator, "flow", time_sampling="logit_normal", repa=None)
    loss, n = loss_fn(model, (x0, labels))        # the engine's ``loss_fn(model, batch) -> (loss, num_images)``

Per batch: ``t`` from the objective's law (DDPM: uniform integer steps; flow: uniform or logit-normal), then the
objective's per-sample loss (DiT's hybrid loss, or SiT's velocity MSE, Eq. 6), averaged. With ``repa`` (the
:class:`~hcvision.diffusion.repa.REPA` wrapper that ``model`` is or wraps: DDP and ``prepare`` keep the module object,
so the reference stays valid), ``repa.weight * L_REPA`` is added (REPA, Eq. 8: ``L = L_diff + lambda L_REPA``),
``L_REPA`` taken from the same forward pass, with the clean images ``x0`` as the encoder's input.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .objectives import make_objective
from .repa import REPA

__all__ = ["DiffusionLoss"]


class DiffusionLoss:
    """``(model, (x0, y)) -> (loss, batch size)``; the returned value is the mean over *all* processes.

    The gradient is the local loss's (DDP averages gradients itself); only the value is replaced by the all-reduced
    mean, ``loss + (global - loss).detach()``, so the trainer logs and NaN-checks the global loss on every rank.
    The randomness (``t``, then the noise) comes from the global RNGs, which the engine reseeds per micro-step, so
    the loss is resume-exact.
    """

    def __init__(self, accelerator: Any, objective: str = "ddpm", time_sampling: Optional[str] = None,
                 repa: Optional[REPA] = None) -> None:
        self.acc, self.repa = accelerator, repa
        self.objective = make_objective(objective, time_sampling=time_sampling)

    def __call__(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, int]:
        x, y = batch
        t = self.objective.sample_timesteps(x.shape[0], device=x.device)
        loss = self.objective.training_losses(model, x, t, y=y)["loss"].mean()
        if self.repa is not None:
            loss = loss + self.repa.weight * self.repa.alignment_loss(images=x).mean()
        if self.acc.num_processes > 1:
            mean = self.acc.reduce(loss.detach().clone(), reduction="mean")
            loss = loss + (mean - loss).detach()
        return loss, int(x.shape[0])
