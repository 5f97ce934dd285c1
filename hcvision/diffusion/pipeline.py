"""A class-conditional diffusers pipeline for any hcvision DiT (:class:`~hcvision.models.diffusers_model.
HCDiTTransformer2DModel`), and DiT's diffusion as diffusers schedulers.

* :class:`HCDiTPipeline` samples it with any diffusers scheduler, any number of classes, in latent space (with an
  ``AutoencoderKL``) or in pixel space (``vae=None``, e.g. the digits DiT). Classifier-free guidance is the DiT's own
  ``forward_with_cfg`` (DiT's contract: guidance on the first ``guidance_channels`` channels, 3 of 4 for SD latents).
  With learned sigma the variance channels go to schedulers that use them (``DDPMScheduler`` with
  ``variance_type="learned_range"``, Improved DDPM Eq. 15) and are split off for all others (DDIM, Euler, DPM-Solver),
  which diffusers' ``DiTPipeline`` does not do for DDPM and which DDIM cannot do itself (see PITFALLS.md).
* :func:`dit_scheduler` builds a diffusers scheduler with DiT's diffusion: linear betas 1e-4..0.02 over 1000 steps,
  no clipping, ``linspace`` respacing (DiT's ``space_timesteps``).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.diffusers_model import HCDiTTransformer2DModel

__all__ = ["HCDiTPipeline", "dit_scheduler"]

_LEARNED_VARIANCE = ("learned", "learned_range")


def dit_scheduler(kind: Union[str, type] = "ddpm", num_train_timesteps: int = 1000) -> SchedulerMixin:
    """A diffusers scheduler with DiT's training diffusion: linear betas 1e-4..0.02 over 1000 steps, no clipping.

    * ``"ddpm"``: ancestral sampling with the learned variance (``learned_range``, Improved DDPM Eq. 15) on
      ``linspace`` respacing, DiT's sampler (``space_timesteps(1000, "250")``).
    * ``"ddim"``: deterministic DDIM (eta 0) on ``leading`` respacing with the last step landing on alpha_bar = 1, as
      ADM/DiT's ``ddimN`` respacing: diffusers' DDIM steps back by ``1000 // N`` whatever the spacing, so ``linspace``
      would evaluate it between the wrong pairs of timesteps.
    * a scheduler class (``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``, ...): built from the same betas
      without ``variance_type``; the pipeline hands it epsilon only.
    """
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    if kind == "ddpm" or kind is DDPMScheduler:
        return DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="linspace", **common)
    if kind == "ddim" or kind is DDIMScheduler:
        return DDIMScheduler(clip_sample=False, timestep_spacing="leading", set_alpha_to_one=True, steps_offset=0,
                             **common)
    if isinstance(kind, type) and issubclass(kind, SchedulerMixin):
        return kind.from_config({**common, "clip_sample": False, "timestep_spacing": "linspace"})
    raise ValueError(f"kind={kind!r} is not known; accepted: 'ddpm', 'ddim' or a diffusers scheduler class")


def _variance_in_step(scheduler: SchedulerMixin) -> bool:
    """True if ``scheduler.step`` takes DiT's ``[eps, v]`` output and uses v (DDPM's learned variance, split by the
    sample's channel count). Other schedulers that read ``variance_type`` slice ``[:, :3]`` (an UnCLIP assumption), so
    a learned ``variance_type`` is refused for them."""
    import inspect

    learned = getattr(scheduler.config, "variance_type", None) in _LEARNED_VARIANCE
    if isinstance(scheduler, DDPMScheduler):
        return learned
    if learned and "variance_type" in inspect.signature(type(scheduler).__init__).parameters:
        raise ValueError(f"{type(scheduler).__name__} with variance_type={scheduler.config.variance_type!r} slices the "
                         "model output to 3 channels; build it without variance_type (dit_scheduler(cls) does): the "
                         "pipeline gives it epsilon only")
    return False


class HCDiTPipeline(DiffusionPipeline):
    """Class-conditional sampling of an :class:`HCDiTTransformer2DModel` with any diffusers scheduler.

    Args:
        transformer: the wrapped DiT.
        scheduler: any diffusers scheduler (:func:`dit_scheduler` gives DiT's settings).
        vae: an ``AutoencoderKL`` decoding latents (``latents / vae.config.scaling_factor``), or None for a pixel-space
            DiT, whose outputs are mapped back with its cfg's mean/std (the digits DiT: ``x * 0.5 + 0.5``).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: HCDiTTransformer2DModel, scheduler: SchedulerMixin,
                 vae: Optional[AutoencoderKL] = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    def _labels(self, class_labels: Union[int, Sequence[int], torch.Tensor]) -> torch.Tensor:
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        k = self.transformer.config.num_classes
        if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty list of class ids, got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if bool(((labels < 0) | (labels >= k)).any()):
            raise ValueError(f"class_labels {labels.tolist()} out of range; accepted: 0..{k - 1}")
        return labels.long().to(self._execution_device)

    def _to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1], NCHW float."""
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            return (x.float() / 2 + 0.5).clamp(0, 1)
        cfg = getattr(self.transformer.dit, "pretrained_cfg", None) or {}
        c = x.shape[1]
        mean = torch.tensor(cfg.get("mean", (0.5,) * c)[:c], device=x.device).view(1, c, 1, 1)
        std = torch.tensor(cfg.get("std", (0.5,) * c)[:c], device=x.device).view(1, c, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int], torch.Tensor],
        guidance_scale: float = 1.0,
        guidance_channels: Optional[int] = None,
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Sample one image per class label.

        Args:
            class_labels: class ids in ``0..num_classes-1``.
            guidance_scale: classifier-free guidance scale (1 = none, DiT's FID setting 1.5); needs a DiT trained
                with label dropout (a null class).
            guidance_channels: channels guided; default 3 for 4-channel latents (DiT), else all.
            num_inference_steps: scheduler steps.
            generator: for the initial noise and the scheduler's noise.
            output_type: ``"np"`` (NHWC float in [0, 1]), ``"pil"``, ``"pt"`` (NCHW float in [0, 1]) or ``"latent"``
                (the final model-space sample).
        """
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; accepted: 'np', 'pil', 'pt', 'latent'")
        dit = self.transformer.dit
        labels = self._labels(class_labels)
        guided = guidance_scale != 1.0
        if guided and self.transformer.null_class is None:
            raise ValueError("guidance_scale != 1 needs a DiT with a null class (trained with class_dropout_prob > 0)")
        if guidance_channels is None:
            guidance_channels = 3 if dit.in_chans == 4 else dit.in_chans
        batch, c = labels.shape[0], dit.in_chans
        x = randn_tensor((batch, c, *dit.input_size), generator=generator, device=self._execution_device,
                         dtype=self.transformer.dtype) * self.scheduler.init_noise_sigma
        y = torch.cat([labels, torch.full_like(labels, self.transformer.null_class)]) if guided else labels
        variance_in_step = _variance_in_step(self.scheduler)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            tt = torch.as_tensor(t, device=x.device).reshape(-1).expand(model_in.shape[0])
            if guided:
                out = self.transformer.forward_with_cfg(model_in, tt, y, guidance_scale, guidance_channels)
                out = out[:batch]  # the conditional half carries the guided epsilon and its own variance
            else:
                out = self.transformer(model_in, tt, y).sample
            if dit.learn_sigma and not variance_in_step:
                out = out[:, :c]  # epsilon only: this scheduler has no learned-variance handling
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        if output_type == "latent":
            images: Any = x
        else:
            images = self._to_images(x)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
