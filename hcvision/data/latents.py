"""Pre-extracted VAE posteriors (or pixels) for latent DiT training, written safely by many processes.

Extraction (``python -m hcvision.data.latents --data-dir IMAGENET/train --out latents/``; several processes with
``torchrun --nproc_per_node N -m hcvision.data.latents ...``):

* every image of an ImageFolder (or of a Hugging Face dataset split, ``--data-dir hfds/NAME --split train``, read
  through timm's hfds reader as train_cls.py reads it) is centre-cropped the way DiT/ADM do it
  (:func:`center_crop_arr`), mapped to [-1, 1] and encoded by a diffusers ``AutoencoderKL`` given by hub id or
  local path (default ``stabilityai/sd-vae-ft-ema``);
* what is stored is the **posterior** ``q(z | x) = N(mean, exp(logvar))`` of the image *and of its horizontal flip*
  (``moments``: ``(views, 2C, h, w)`` = mean then logvar, logvar clamped to [-30, 20] as diffusers does). Training
  then draws a fresh ``z = scale * (mean + exp(logvar / 2) * eps)`` every epoch and picks one of the two views at
  random. Storing the flipped view, rather than flipping the latent, is needed because the VAE is not
  flip-equivariant: ``flip(E(x)) != E(flip(x))``. This doubles the storage (about 64 KiB per ImageNet image in
  float32) but keeps exactly the augmentation of pixel-space training, as fast-DiT-style pipelines do;
  ``flip=False`` stores one view;
* ``vae="none"`` is the pixel-space mode: the cropped images are stored as uint8 and flipped at training time
  (flipping pixels is exact).

Layout of ``out_dir``::

    shards/000000000-000001024.safetensors   global indices [0, 1024): index, label, moments | pixels
    shards/000001024-000002048.safetensors   ...
    manifest.json                            written last, by rank 0: its presence means "complete"

Shard ``k`` holds global indices ``[k * shard_size, (k + 1) * shard_size)`` and is written by rank
``k % world_size`` only, so ranks never write the same file; each file is written under a temporary name and
renamed. After a barrier, rank 0 checks that the shards cover every index exactly once (no gaps, no duplicates)
and writes the manifest. A rerun with the same settings skips finished shards (resume after a crash or
preemption, with any number of processes).

Training reads a directory through :class:`~hcvision.data.latent_dataset.LatentDataset` (its own module: a
training run needs none of the extraction).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..cli import UsageError, run_cli
from ..io import save_safetensors, write_json
from ..outputs import run_dir_lock
from .latent_dataset import FORMAT_VERSION, MANIFEST, SHARD_DIR, LatentDataset, is_latent_dir, read_manifest
from .vae import DEFAULT_SCALE_FACTOR, DEFAULT_VAE, VaeUnavailableError, encode_moments, load_vae

__all__ = [
    "DEFAULT_VAE",
    "DEFAULT_SCALE_FACTOR",
    "ExtractionSettings",
    "LatentDataset",
    "VaeUnavailableError",
    "center_crop_arr",
    "extract_latents",
    "is_latent_dir",
    "load_vae",
    "process_state",
    "read_manifest",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------
def process_state() -> Any:
    """Accelerate's ``PartialState`` for this launch (torchrun, accelerate launch or a single process).

    Without ``cpu=True`` Accelerate ignores torchrun's environment on a machine without an accelerator and every
    process believes it is rank 0 of 1; so CPU is requested explicitly when there is no accelerator.
    """
    from accelerate import PartialState

    acc = getattr(torch, "accelerator", None)  # torch >= 2.6; its current_accelerator() names a build, not a device
    has_accelerator = acc.is_available() if acc is not None else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


# ------------------------------------------------------------------------------------------------
# Image preprocessing
# ------------------------------------------------------------------------------------------------
def center_crop_arr(image: Any, image_size: int) -> np.ndarray:
    """DiT/ADM centre crop: halve with a box filter while the short side is >= 2x the target, resize the short
    side to ``image_size`` with bicubic, then crop the centre square. Returns an ``(S, S, C)`` uint8 array."""
    from PIL import Image

    while min(image.size) >= 2 * image_size:  # box halving first avoids aliasing of one big bicubic step
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size].copy()  # own, writable memory


class _FolderImages:
    """An ImageFolder's files by index as ``(PIL image, label)`` (picklable, for loader workers)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], mode: str) -> None:
        self.samples, self.mode = samples, mode

    def __call__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with open(path, "rb") as f:
            return Image.open(f).convert(self.mode), label


def open_images(data_dir: PathLike, mode: str = "RGB", split: str = "train", data_root: str = ""
                ) -> Tuple[Callable[[int], Tuple[Any, int]], List[str], int, str]:
    """``(load(index) -> (PIL image, label), class names, count, description)`` of a folder or ``hfds/NAME`` source
    (:mod:`.sources`; ``split``/``data_root`` are for hfds). WebDataset shards have no random access, which the
    index-sharded extraction needs, and are refused."""
    from torchvision.datasets import ImageFolder

    from .sources import hfds_dataset, parse_data

    source = parse_data(str(data_dir), data_root, key="data_dir")
    if source.kind == "hfds":
        images = hfds_dataset(source, split, mode=mode)
        return images.load, images.classes, len(images), f"{source.timm_name}[{split}]"
    if source.kind != "folder":
        raise UsageError(f"data_dir={str(data_dir)!r}: latent extraction reads an ImageFolder (<class>/<image>) or "
                         "hfds/NAME, whose images it shards by index; WebDataset shards have no random access")
    if not Path(data_dir).is_dir():
        raise UsageError(f"data_dir={str(data_dir)!r} does not exist; expected an ImageFolder (<class>/<image>) or "
                         "hfds/NAME")
    try:
        folder = ImageFolder(str(data_dir), loader=lambda p: p)  # only the file list; decoding happens per shard
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"data_dir={str(data_dir)!r} is not an ImageFolder (<class>/<image> files): {e}") from None
    return _FolderImages(folder.samples, mode), folder.classes, len(folder.samples), str(data_dir)


class _Cropped(Dataset):
    """Images by index as centre-cropped uint8 ``(C, S, S)`` tensors; a bad image fails with its name."""

    def __init__(self, load: Callable[[int], Tuple[Any, int]], indices: Sequence[int], image_size: int,
                 name: str) -> None:
        self.load, self.indices, self.image_size, self.name = load, list(indices), image_size, name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, int]:
        index = self.indices[i]
        try:
            image, label = self.load(index)
        except Exception as e:  # one unreadable image would leave a gap: stop and name it (finished shards are kept)
            raise RuntimeError(f"cannot read image {index} of {self.name!r}: {type(e).__name__}: {e}; fix or remove "
                               "it and rerun: finished shards are kept") from None
        arr = center_crop_arr(image, self.image_size)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label, index


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------
@dataclass
class ExtractionSettings:
    """Everything that determines the content of a latent directory (recorded in every shard and the manifest)."""

    vae: str = DEFAULT_VAE  # hub id, local directory, or "none" (pixels)
    image_size: int = 256
    flip: bool = True  # VAE mode: also store the posterior of the horizontally flipped image
    dtype: str = "float32"  # storage dtype of the moments
    shard_size: int = 1024
    channels: str = "RGB"  # PIL mode of the images: "RGB" or "L"
    scale_factor: float = DEFAULT_SCALE_FACTOR

    @property
    def pixel_mode(self) -> bool:
        return self.vae.lower() == "none"

    def validate(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise UsageError(f"image_size={self.image_size!r} is not valid; expected an integer >= 1")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype={self.dtype!r} is not valid; expected one of {sorted(DTYPES)}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise UsageError(f"shard_size={self.shard_size!r} is not valid; expected an integer >= 1")
        if self.channels not in ("RGB", "L"):
            raise UsageError(f"channels={self.channels!r} is not valid; expected 'RGB' or 'L'")
        if not self.pixel_mode and self.channels != "RGB":
            raise UsageError("channels='L' needs vae='none': an AutoencoderKL encodes RGB images")
        if not self.scale_factor > 0:
            raise UsageError(f"scale_factor={self.scale_factor!r} is not valid; expected a number > 0")


def _shard_name(start: int, stop: int) -> str:
    return f"{start:09d}-{stop:09d}.safetensors"


def _fingerprint(settings: ExtractionSettings, classes: Sequence[str], num_samples: int) -> Dict[str, Any]:
    return {"format": FORMAT_VERSION, **asdict(settings), "classes": list(classes), "num_samples": num_samples}


def _shard_is_done(path: Path, fingerprint: Dict[str, Any], start: int, stop: int) -> bool:
    """A finished shard of *this* extraction; a shard from different settings is an error, not a skip."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("settings", "{}"))
        index = f.get_tensor("index")
    if meta != fingerprint:
        raise UsageError(f"shard {str(path)!r} was written with other settings ({meta}); use a new out_dir or "
                         "delete it")
    if not torch.equal(index, torch.arange(start, stop)):
        raise UsageError(f"shard {str(path)!r} does not hold indices [{start}, {stop}); delete it and rerun")
    return True


def _save_shard(tensors: Dict[str, torch.Tensor], path: Path, fingerprint: Dict[str, Any]) -> None:
    # atomic: a shard is either complete or absent
    save_safetensors(tensors, path, metadata={"settings": json.dumps(fingerprint)})


@torch.no_grad()
def extract_latents(
    data_dir: PathLike,
    out_dir: PathLike,
    settings: Optional[ExtractionSettings] = None,
    *,
    split: str = "train",
    data_root: str = "",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    vae: Any = None,
) -> Optional[Dict[str, Any]]:
    """Encode an ImageFolder (``data_dir/<class>/<image>``) or split ``split`` of ``hfds/NAME`` (cached in
    ``data_root``) into ``out_dir``; collective over all processes.

    Call it on every process (``torchrun``/``accelerate launch``; a single process needs nothing). ``vae``
    optionally passes an already loaded ``AutoencoderKL`` (tests); otherwise ``settings.vae`` is loaded. Returns
    the manifest on rank 0, ``None`` elsewhere.
    """
    settings = settings or ExtractionSettings()
    settings.validate()
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} is not valid; expected an integer >= 1")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise UsageError(f"out_dir={str(out_dir)!r} already holds a complete extraction ({MANIFEST}); choose "
                         "another directory")
    load, classes, n, name = open_images(data_dir, settings.channels, split, data_root)
    if n == 0:
        raise UsageError(f"data_dir={name!r} holds no images")
    state = process_state()
    if vae is None and not settings.pixel_mode:
        vae = load_vae(settings.vae, state.device)
    if vae is not None and not settings.pixel_mode:  # the VAE's own factor (0.18215 for the SD VAEs)
        settings = replace(settings, scale_factor=float(getattr(vae.config, "scaling_factor", settings.scale_factor)))
    fingerprint = _fingerprint(settings, classes, n)
    shard_dir = out_dir / SHARD_DIR
    if state.is_main_process:
        shard_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    bounds = [(s, min(s + settings.shard_size, n)) for s in range(0, n, settings.shard_size)]
    mine = [b for k, b in enumerate(bounds) if k % state.num_processes == state.process_index]
    todo = [b for b in mine if not _shard_is_done(shard_dir / _shard_name(*b), fingerprint, *b)]
    bar = None
    if progress and state.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(b - a for a, b in todo), desc=f"extract (rank 0 of {state.num_processes})")
    store = DTYPES[settings.dtype]
    for start, stop in todo:
        ds = _Cropped(load, range(start, stop), settings.image_size, name)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        parts: List[torch.Tensor] = []
        labels: List[torch.Tensor] = []
        index: List[torch.Tensor] = []
        for images, y, idx in loader:
            if settings.pixel_mode:
                parts.append(images)
            else:
                views = [encode_moments(vae, images)]
                if settings.flip:
                    views.append(encode_moments(vae, images.flip(-1)))
                parts.append(torch.stack(views, dim=1).to(store))
            labels.append(y.long())
            index.append(idx.long())
            if bar is not None:
                bar.update(len(y))
        key = "pixels" if settings.pixel_mode else "moments"
        _save_shard({"index": torch.cat(index), "label": torch.cat(labels), key: torch.cat(parts)},
                    shard_dir / _shard_name(start, stop), fingerprint)
    if bar is not None:
        bar.close()
    state.wait_for_everyone()  # every rank's shards are on disk before rank 0 checks coverage
    manifest = None
    if state.is_main_process:
        manifest = _finalize(out_dir, bounds, fingerprint, settings)
    state.wait_for_everyone()
    return manifest


def _finalize(out_dir: Path, bounds: List[Tuple[int, int]], fingerprint: Dict[str, Any],
              settings: ExtractionSettings) -> Dict[str, Any]:
    """Check that the shards cover every index exactly once, then write the manifest (rank 0)."""
    from safetensors import safe_open

    shard_dir = out_dir / SHARD_DIR
    expected = {_shard_name(*b) for b in bounds}
    found = {p.name for p in shard_dir.glob("*.safetensors")}
    if found - expected:
        raise UsageError(f"{str(shard_dir)!r} holds unexpected shards {sorted(found - expected)[:4]}; remove them")
    if expected - found:
        raise RuntimeError(f"shards missing after extraction: {sorted(expected - found)[:4]}")
    seen = np.zeros(fingerprint["num_samples"], dtype=np.int64)
    shape = None
    for start, stop in bounds:
        with safe_open(str(shard_dir / _shard_name(start, stop)), framework="pt") as f:
            np.add.at(seen, f.get_tensor("index").numpy(), 1)
            shape = f.get_slice("pixels" if settings.pixel_mode else "moments").get_shape()[1:]
    if not (seen == 1).all():
        raise RuntimeError(f"indices not covered exactly once: gaps {np.flatnonzero(seen == 0)[:8].tolist()}, "
                           f"duplicates {np.flatnonzero(seen > 1)[:8].tolist()}")
    if settings.pixel_mode:
        sample_shape = list(shape)
        views = 1
    else:
        views, two_c, h, w = shape
        sample_shape = [two_c // 2, h, w]
    manifest = {**fingerprint, "mode": "pixels" if settings.pixel_mode else "vae", "views": int(views),
                "sample_shape": [int(s) for s in sample_shape],
                "shards": [{"file": f"{SHARD_DIR}/{_shard_name(a, b)}", "start": a, "stop": b} for a, b in bounds]}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hcvision.data.latents",
                                description="Extract VAE posteriors (or pixels) of an ImageFolder for DiT training. "
                                            "Several processes: torchrun --nproc_per_node N -m hcvision.data.latents")
    p.add_argument("--data-dir", required=True, help="ImageFolder root: <class>/<image> (e.g. imagenet/train), or "
                                                     "hfds/NAME (a local Hugging Face dataset directory or a Hub id)")
    p.add_argument("--split", default="train", help="hfds: the split to extract (default train)")
    p.add_argument("--data-root", default="", help="hfds: the Hugging Face datasets cache directory")
    p.add_argument("--out", required=True, help="output directory (new, or a partial extraction to resume)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"hub id or local diffusers directory, or 'none' for pixels "
                                                      f"(default {DEFAULT_VAE})")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--no-flip", action="store_true", help="do not store the posterior of the flipped image")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="storage dtype of the moments (float16 halves the disk space, but its rounding of the "
                        "mean may be as large as the posterior std it is meant to sample)")
    p.add_argument("--channels", default="RGB", choices=("RGB", "L"), help="image mode (L: grey, pixel mode only)")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    args = p.parse_args(argv)
    settings = ExtractionSettings(vae=args.vae, image_size=args.image_size, flip=not args.no_flip, dtype=args.dtype,
                                  shard_size=args.shard_size, channels=args.channels)
    with run_dir_lock(args.out, "--out"):  # checked writable, then one extraction per directory
        manifest = extract_latents(args.data_dir, args.out, settings, split=args.split, data_root=args.data_root,
                                   batch_size=args.batch_size,
                                   num_workers=args.num_workers)
    if manifest is not None:
        print(json.dumps({k: manifest[k] for k in ("num_samples", "mode", "views", "sample_shape", "scale_factor")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="hcvision.data.latents"))
