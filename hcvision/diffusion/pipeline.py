"""A class-conditional diffusers pipeline for any hcvision DiT (:class:`~hcvision.models.diffusers_model.
HCDiTTransformer2DModel`), and DiT's diffusion as diffusers schedulers.

* :class:`HCDiTPipeline` samples it, DDPM-trained or flow-trained, in latent space (with an ``AutoencoderKL``) or in
  pixel space (``vae=None``, e.g. the digits DiT), for any number of classes. It runs hcvision's one sampling loop
  (:func:`hcvision.diffusion.sample`, what ``python -m hcvision.sample`` and train_dit's final evaluation run), so
  guidance (scale, channels, interval) and the per-image generators mean what they mean on the command line, and
  the same seed and sampler give the same images. The sampler is the pipeline's diffusers ``scheduler`` or, by
  name, any of hcvision's (``sampler="heun"`` / ``"sde"`` for flow DiTs have no diffusers scheduler).
* DDPM schedulers (:func:`dit_scheduler`: linear betas 1e-4..0.02 over 1000 steps, no clipping): with learned sigma
  the variance channels go to ``DDPMScheduler(variance_type="learned_range")`` (Improved DDPM Eq. 15) and are split
  off for every other scheduler (DDIM, Euler, DPM-Solver), which diffusers' ``DiTPipeline`` does not do for DDPM and
  which DDIM cannot do itself (see PITFALLS.md).
* The flow convention (SiT; :mod:`hcvision.diffusion.flow`): ``x_t = (1 - t) x_0 + t eps``, the DiT predicts the
  velocity ``eps - x_0`` and is called at model time ``999 t``. ``FlowMatchEulerDiscreteScheduler`` (diffusers'
  default config: shift 1, 1000 training steps; ``dit_scheduler("euler")``) is set on the sigmas ``t_i = 1 - i / N``
  (then shifted by its ``shift``, if any), its sigma is our ``t`` and its step is Euler on ``dx/dt = v``; its own
  ``timesteps`` (``1000 sigma``) are not what the model is called with.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..data.vae import vae_decoder
from ..models.diffusers_model import HCDiTTransformer2DModel
from ..sampling_spec import SamplingSpec
from .guidance import resolve_guidance_channels
from .objectives import OBJECTIVES
from .sampling import make_sampler, sample

__all__ = ["HCDiTPipeline", "dit_scheduler"]


def dit_scheduler(kind: Union[str, type] = "ddpm", num_train_timesteps: int = 1000) -> SchedulerMixin:
    """A diffusers scheduler with DiT's training diffusion: linear betas 1e-4..0.02 over 1000 steps, no clipping.

    * ``"ddpm"``: ancestral sampling with the learned variance (``learned_range``, Improved DDPM Eq. 15) on
      ``linspace`` respacing, DiT's sampler (``space_timesteps(1000, "250")``).
    * ``"ddim"``: deterministic DDIM (eta 0) on ``leading`` respacing with the last step landing on alpha_bar = 1, as
      ADM/DiT's ``ddimN`` respacing: diffusers' DDIM steps back by ``1000 // N`` whatever the spacing, so ``linspace``
      would evaluate it between the wrong pairs of timesteps.
    * a scheduler class (``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``, ...): built from the same betas
      without ``variance_type``; the pipeline hands it epsilon only.
    * ``"euler"`` or ``FlowMatchEulerDiscreteScheduler``: for flow DiTs, Euler on the velocity with shift 1 (the
      module's flow convention; hcvision's ``euler`` sampler).
    """
    if kind in ("euler", FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    if kind == "ddpm" or kind is DDPMScheduler:
        return DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="linspace", **common)
    if kind == "ddim" or kind is DDIMScheduler:
        return DDIMScheduler(clip_sample=False, timestep_spacing="leading", set_alpha_to_one=True, steps_offset=0,
                             **common)
    if isinstance(kind, type) and issubclass(kind, SchedulerMixin):
        return kind.from_config({**common, "clip_sample": False, "timestep_spacing": "linspace"})
    raise ValueError(f"kind={kind!r} is not known; accepted: 'ddpm', 'ddim', 'euler' (flow) or a diffusers scheduler "
                     "class")


class HCDiTPipeline(DiffusionPipeline):
    """Class-conditional sampling of an :class:`HCDiTTransformer2DModel`, DDPM or flow, with any diffusers scheduler.

    Args:
        transformer: the wrapped DiT (its ``config.objective``, when recorded, is checked against the sampler).
        scheduler: a diffusers scheduler: :func:`dit_scheduler` gives DiT's settings for DDPM DiTs, and
            ``FlowMatchEulerDiscreteScheduler()`` samples flow DiTs (see the module's flow convention).
        vae: an ``AutoencoderKL`` decoding latents (``latents / vae.config.scaling_factor``), or None for a pixel-space
            DiT, whose outputs are mapped back with its cfg's mean/std (the digits DiT: ``x * 0.5 + 0.5``).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: HCDiTTransformer2DModel, scheduler: SchedulerMixin,
                 vae: Optional[AutoencoderKL] = None) -> None:
        super().__init__()
        objective = transformer.config.get("objective")
        if objective not in (None, *OBJECTIVES):
            raise ValueError(f"the transformer's config.objective={objective!r} is not valid; accepted: None (not "
                             f"recorded), {', '.join(OBJECTIVES)}")
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
        """Model space -> images in [0, 1], NCHW float: the VAE's decoding (:func:`hcvision.data.vae.vae_decoder`,
        the one :mod:`hcvision.sample` uses) or, in pixel space, the DiT cfg's mean/std (digits: ``x * 0.5 + 0.5``)."""
        if self.vae is not None:
            x = vae_decoder(self.vae)(x)
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
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_interval: Tuple[float, float] = (0.0, 1.0),
        sampler: Optional[str] = None,
        diffusion_norm: float = 1.0,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Sample one image per class label through hcvision's one sampling loop (:func:`hcvision.diffusion.sample`,
        what ``python -m hcvision.sample`` runs): the same seed and sampler give the same images.

        Args:
            class_labels: class ids in ``0..num_classes-1``.
            guidance_scale: classifier-free guidance scale (1 = none, DiT's FID setting 1.5); needs a DiT trained
                with label dropout (a null class).
            guidance_channels: channels guided; ``None`` or 0: 3 for 4-channel latents (DiT), else all.
            num_inference_steps: sampling steps.
            generator: one generator for the batch, or one per image (then image ``i`` depends on ``generator[i]``
                only, as in ``hcvision.sample``).
            output_type: ``"pil"`` (diffusers' default), ``"np"`` (NHWC float in [0, 1]), ``"pt"`` (NCHW float in
                [0, 1]) or ``"latent"`` (the final model-space sample).
            guidance_interval: guide only at noise levels in ``[lo, hi]`` (0 = data, 1 = noise; REPA: (0, 0.7)).
            sampler: ``None`` runs the pipeline's ``scheduler``; a name of ``hcvision.diffusion.SAMPLERS``
                (``ddpm``, ``ddim``, ``dpmsolver++`` for DDPM DiTs; ``euler``, ``heun``, ``sde`` for flow DiTs) runs
                that sampler instead, exactly as the sampling CLI does.
            diffusion_norm: the ``sde`` sampler's diffusion coefficient ``w_t = diffusion_norm * t`` (SiT: 1,
                REPA: 2).
        """
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; accepted: 'np', 'pil', 'pt', 'latent'")
        # the settings' ranges are declared once (hcvision.sampling_spec); a bad value is a ValueError naming it
        spec = SamplingSpec(sampler=sampler or "", sampling_steps=num_inference_steps, guidance_scale=guidance_scale,
                            guidance_channels=guidance_channels or 0, guidance_interval=guidance_interval,
                            diffusion_norm=diffusion_norm)
        dit = self.transformer.dit
        labels = self._labels(class_labels)
        if spec.guidance_scale != 1.0 and self.transformer.null_class is None:
            raise ValueError("guidance_scale != 1 needs a DiT with a null class (trained with class_dropout_prob > 0)")
        device = self._execution_device
        runner = make_sampler(spec.sampler or self.scheduler, spec.sampling_steps, device,
                              sde_diffusion_norm=spec.diffusion_norm)
        dtype = self.transformer.dtype
        model = dit if dtype == torch.float32 else (lambda x, t, y: dit(x.to(dtype), t, y).float())
        x = sample(model, (labels.shape[0], dit.in_chans, *dit.input_size), labels, scheduler=runner,
                   guidance_scale=spec.guidance_scale, guidance_interval=spec.guidance_interval,
                   guidance_channels=resolve_guidance_channels(spec.guidance_channels, dit.in_chans),
                   null_class=self.transformer.null_class, generator=generator, device=device,
                   objective=self.transformer.config.get("objective"),
                   progress=not (getattr(self, "_progress_bar_config", None) or {}).get("disable", False))
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
