"""The VAE of latent DiTs: loading a diffusers ``AutoencoderKL`` from a local directory or a hub id, encoding images
to posterior moments (latent extraction, :mod:`hcvision.data.latents`) and decoding samples (:func:`vae_decoder`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..cli import UsageError

__all__ = ["DEFAULT_VAE", "DEFAULT_SCALE_FACTOR", "VaeUnavailableError", "encode_moments", "load_vae", "vae_decoder"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_SCALE_FACTOR = 0.18215  # SD VAE latents scaled to ~unit variance (DiT, LDM)


class VaeUnavailableError(UsageError):
    """The VAE could not be loaded (missing local path, or a hub id while offline)."""


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is meant as a path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _how_to_supply(spec: str) -> str:
    hub_id = spec if not _looks_like_path(spec) else DEFAULT_VAE
    return (f"On a machine with internet run `huggingface-cli download {hub_id} "
            f"--local-dir DIR` (or `AutoencoderKL.from_pretrained(...).save_pretrained(DIR)`), copy DIR here and pass "
            f"its path as the VAE (vae=DIR / --vae DIR); `none` trains in pixel space without a VAE")


def load_vae(spec: str = DEFAULT_VAE, device: Union[str, torch.device] = "cpu") -> Any:
    """A diffusers ``AutoencoderKL`` in eval mode from a local directory or a hub id.

    A hub id is first looked up in the local Hugging Face cache; only then (and unless ``HF_HUB_OFFLINE=1``)
    is the hub contacted. Every failure raises :class:`VaeUnavailableError` saying how to supply a local copy.
    """
    from diffusers import AutoencoderKL

    if not isinstance(spec, str) or not spec or spec.lower() == "none":
        raise UsageError(f"vae={spec!r} does not name a VAE; expected a local directory or a hub id such as "
                         f"{DEFAULT_VAE!r}")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise VaeUnavailableError(f"vae={spec!r} is a local path but holds no config.json; expected a diffusers "
                                      f"AutoencoderKL directory (save_pretrained layout). {_how_to_supply(spec)}")
        try:
            vae = AutoencoderKL.from_pretrained(str(path))
        except Exception as e:  # wrong model type, corrupt weights, ...
            raise VaeUnavailableError(f"vae={spec!r} could not be loaded as a diffusers AutoencoderKL: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        return vae.to(device).eval().requires_grad_(False)
    if _looks_like_path(spec):
        raise VaeUnavailableError(f"vae={spec!r} does not exist. {_how_to_supply(spec)}")
    try:
        vae = AutoencoderKL.from_pretrained(spec, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise VaeUnavailableError(f"vae={spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                                      f"{_how_to_supply(spec)}") from None
        try:
            vae = AutoencoderKL.from_pretrained(spec)
        except Exception as e:
            raise VaeUnavailableError(f"vae={spec!r} could not be downloaded from the Hugging Face hub "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); offline? "
                                      f"{_how_to_supply(spec)}") from None
    return vae.to(device).eval().requires_grad_(False)


def encode_moments(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Posterior moments ``(B, 2C, h, w)`` (mean, clamped logvar) of uint8 images ``(B, 3, S, S)``."""
    x = images.to(device=vae.device, dtype=vae.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float().cpu()


def vae_decoder(vae: Any, scale_factor: Optional[float] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode(z)``: latents of a DiT -> images in [-1, 1], ``vae.decode(z / scale).sample`` (LDM/DiT). ``scale`` is
    ``scale_factor``, else the VAE's ``config.scaling_factor``, else :data:`DEFAULT_SCALE_FACTOR`. The one decoding
    of the project: the sampling CLI, train_dit's final samples and the diffusers pipeline all use it."""
    scale = float(scale_factor or getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE_FACTOR)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(vae.dtype) / scale).sample

    return decode
