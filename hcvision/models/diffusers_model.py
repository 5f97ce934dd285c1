"""diffusers interop: any hcvision DiT as a diffusers model (its pipeline: :mod:`hcvision.diffusion.pipeline`).

* :class:`HCDiTTransformer2DModel` wraps a registered hcvision DiT (any size, connection kind and rate) as a diffusers
  ``ModelMixin`` / ``ConfigMixin``: its config is the timm name and the kwargs the DiT was built with, so
  ``save_pretrained`` / ``from_pretrained`` round-trip bit-exactly (safetensors). ``config.sample_size``,
  ``in_channels`` and ``out_channels`` are recorded as diffusers' ``DiTTransformer2DModel`` records them, and
  ``forward(hidden_states, timestep, class_labels)`` returns a ``Transformer2DModelOutput``.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["HCDiTTransformer2DModel"]


def _json_kwargs(model_kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    try:  # the config is saved as JSON; tuples come back as lists, which the DiT accepts
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model_kwargs must be JSON-serialisable to be saved in a diffusers config: {err}") from None


class HCDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A registered hcvision DiT (``timm.create_model(model_name, **model_kwargs)``) as a diffusers model.

    Args:
        model_name: registered DiT name, e.g. ``"dit_xl_2_shc2"`` or ``"dit_digits_2_dhc2"``.
        model_kwargs: keyword arguments the DiT is built with (``connection``, ``rate``, ``num_classes``, ...).
        sample_size, in_channels, out_channels, num_classes: filled in from the built DiT (diffusers' names, read by
            pipelines); given values must agree with it.
        objective: what the DiT was trained for, ``"ddpm"`` or ``"flow"`` (None: not recorded); the pipeline refuses
            a sampler of the other objective.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, model_name: str, model_kwargs: Optional[dict[str, Any]] = None,
                 sample_size: Optional[int] = None, in_channels: Optional[int] = None,
                 out_channels: Optional[int] = None, num_classes: Optional[int] = None,
                 objective: Optional[str] = None) -> None:
        super().__init__()
        import timm

        from .loading import check_model_name  # (importing it registers the DiT family with timm)

        check_model_name(model_name, "dit_", what="hcvision DiT", key="model_name")
        self.dit = timm.create_model(model_name, **_json_kwargs(model_kwargs))
        h, w = self.dit.input_size
        actual = dict(sample_size=h if h == w else [h, w], in_channels=self.dit.in_chans,
                      out_channels=self.dit.out_channels, num_classes=self.dit.num_classes)
        given = dict(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                     num_classes=num_classes)
        wrong = {k: (v, actual[k]) for k, v in given.items() if v is not None and v != actual[k]}
        if wrong:
            raise ValueError(f"config disagrees with {model_name!r} built with {model_kwargs}: "
                             + ", ".join(f"{k}={v!r} (the model has {a!r})" for k, (v, a) in wrong.items()))
        self.register_to_config(**actual)

    @classmethod
    def from_dit(cls, dit: torch.nn.Module, model_name: Optional[str] = None,
                 model_kwargs: Optional[dict[str, Any]] = None, objective: Optional[str] = None
                 ) -> "HCDiTTransformer2DModel":
        """Wrap an existing DiT (its weights are copied). ``model_name`` defaults to the timm name it was created
        with; ``model_kwargs`` must be those it was built with (``objective``: see the class): the rebuilt model is
        checked to give the same output
        on a probe input, so kwargs that change the computation without changing shapes (``tanh``, ``numerics``) are
        not silently lost."""
        name = model_name or (getattr(dit, "pretrained_cfg", None) or {}).get("architecture")
        if not name:
            raise ValueError("the DiT does not record its timm name; pass model_name=")
        wrapped = cls(name, model_kwargs, objective=objective)
        try:
            wrapped.dit.load_state_dict(dit.state_dict(), strict=True)
        except RuntimeError as err:
            raise ValueError(f"the DiT does not fit {name!r} built with {model_kwargs}; pass the model_kwargs it was "
                             f"built with ({str(err).splitlines()[0]})") from None
        wrapped.to(next(dit.parameters()).device)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(2, dit.in_chans, *dit.input_size, generator=gen).to(next(dit.parameters()).device)
        t = torch.tensor([1, 500], device=probe.device)  # two timesteps of DiT's 1000-step diffusion
        y = torch.tensor([0, dit.num_classes - 1], device=probe.device)
        was_training = dit.training
        dit.eval()
        wrapped.eval()
        with torch.no_grad():
            same = torch.equal(dit(probe, t, y), wrapped.dit(probe, t, y))
        dit.train(was_training)
        if not same:
            raise ValueError(f"the DiT computes differently from {name!r} built with {model_kwargs}: pass the "
                             "model_kwargs it was built with (e.g. tanh, numerics, connection_options)")
        return wrapped

    @property
    def null_class(self) -> Optional[int]:
        return self.dit.null_class

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True) -> Union[Transformer2DModelOutput, tuple]:
        """``(B, C, H, W)`` noisy input, ``(B,)`` timesteps, ``(B,)`` class ids -> ``(B, out_channels, H, W)``."""
        out = self.dit(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def forward_with_cfg(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                         guidance_scale: float, guidance_channels: Optional[int]) -> torch.Tensor:
        """The DiT's classifier-free guidance (``[cond; uncond]`` batch, see ``HCDiT.forward_with_cfg``)."""
        return self.dit.forward_with_cfg(hidden_states, timestep, class_labels, guidance_scale, guidance_channels)
