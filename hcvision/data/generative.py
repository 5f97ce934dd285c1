"""The diffusion trainer's data: the embedded digits in pixel space or a latent directory, plus the decoder."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from ..cli import UsageError
from .digits import DigitsDataset

__all__ = ["digits_pixels", "diffusion_dataset", "sample_decoder"]


def digits_pixels(split: str) -> Dataset:
    """The digits split as ``(x in [-1, 1] of shape (1, 8, 8), label)``: the DiT digits cfg's mean = std = 0.5.

    No shift augmentation: the model is scored against the unshifted held-out digits.
    """
    return DigitsDataset(split, mean=(0.5,), std=(0.5,), augment=False)


def diffusion_dataset(data_dir: str, seed: int = 0, hflip: bool = True
                      ) -> Tuple[Dataset, Tuple[int, ...], List[str], Dict[str, Any]]:
    """(train set, sample shape (C, H, W), class names, data info) for ``data_dir`` ('' = digits pixels)."""
    if not data_dir:
        ds = digits_pixels("train")
        return ds, (1, 8, 8), list(ds.classes), {"mode": "pixels", "data": "digits"}
    from .latents import LatentDataset, read_manifest

    try:
        manifest = read_manifest(data_dir)
    except ValueError as e:
        raise UsageError(f"data_dir={data_dir!r}: {e}") from None
    ds = LatentDataset(data_dir, seed=seed, hflip=hflip)
    info = {"mode": manifest["mode"], "data": data_dir, "vae": manifest["vae"],
            "scale_factor": manifest["scale_factor"]}
    return ds, tuple(manifest["sample_shape"]), list(manifest["classes"]), info


def sample_decoder(info: Dict[str, Any], vae: str, device: torch.device
                   ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Latents -> images through the run's VAE (``vae`` overrides the recorded one); ``None`` in pixel space."""
    if info["mode"] == "pixels":
        return None
    from .latents import load_vae

    model = load_vae(vae or info["vae"], device)
    scale = float(info["scale_factor"])
    return lambda z: model.decode(z.to(model.dtype) / scale).sample
