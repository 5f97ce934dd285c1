"""The diffusion trainer's data: the embedded digits in pixel space or a latent directory, plus the decoder."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from ..cli import UsageError
from .digits import digits_pixels

__all__ = ["diffusion_dataset", "check_model_fits", "check_decoder", "sample_decoder"]


def diffusion_dataset(data_dir: str, seed: int = 0, hflip: bool = True
                      ) -> Tuple[Dataset, Tuple[int, ...], List[str], Dict[str, Any]]:
    """(train set, sample shape (C, H, W), class names, data info) for ``data_dir`` ('' = digits pixels)."""
    if not data_dir:
        ds = digits_pixels("train")
        return ds, (1, 8, 8), list(ds.classes), {"mode": "pixels", "data": "digits"}
    from .latent_dataset import LatentDataset, read_manifest

    try:
        manifest = read_manifest(data_dir)
    except ValueError as e:
        raise UsageError(f"data_dir={data_dir!r}: {e}") from None
    ds = LatentDataset(data_dir, seed=seed, hflip=hflip)
    info = {"mode": manifest["mode"], "data": data_dir, "vae": manifest["vae"],
            "scale_factor": manifest["scale_factor"]}
    return ds, tuple(manifest["sample_shape"]), list(manifest["classes"]), info


def check_model_fits(model: str, model_kwargs: Dict[str, Any], sample_shape: Tuple[int, ...],
                     num_classes: int) -> torch.nn.Module:
    """The data's sample shape and class count must be what ``model`` takes; returns it built on the meta device."""
    from ..models.loading import create_model

    declared = model_kwargs.get("num_classes")
    if declared is not None and int(declared) != num_classes:
        raise UsageError(f"model_kwargs.num_classes={declared!r} does not match the {num_classes} classes of the data "
                         f"(class ids 0..{num_classes - 1}); drop it or use matching data")
    built = create_model(model, {**model_kwargs, "num_classes": num_classes}, meta=True)
    takes = (built.in_chans, *built.input_size)
    if tuple(sample_shape) != takes:
        raise UsageError(
            f"the data's samples have shape {tuple(sample_shape)} but model={model!r} takes {takes}; choose a "
            f"model for this input (e.g. a dit_* model for 4x32x32 SD-VAE latents of 256px images, dit_digits_2_* "
            f"for the digits) or set model_kwargs.input_size={sample_shape[-1]} / model_kwargs.in_chans="
            f"{sample_shape[0]}")
    return built


def check_decoder(info: Dict[str, Any], vae: str) -> None:
    """Load the VAE that :func:`sample_decoder` will need after training, so a missing one fails before training."""
    if info["mode"] == "pixels":
        return
    from .vae import load_vae

    try:
        load_vae(vae or info["vae"])
    except Exception as e:  # noqa: BLE001  (missing, damaged or foreign: the message says which)
        raise UsageError(f"{e} (or set eval_samples=0 to train without sampling)") from None


def sample_decoder(info: Dict[str, Any], vae: str, device: torch.device
                   ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Latents -> images through the run's VAE (``vae`` overrides the recorded one); ``None`` in pixel space."""
    if info["mode"] == "pixels":
        return None
    from .vae import load_vae, vae_decoder

    return vae_decoder(load_vae(vae or info["vae"], device), float(info["scale_factor"]))
