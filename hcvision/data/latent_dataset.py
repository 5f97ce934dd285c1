"""Reading a latent directory written by :mod:`hcvision.data.latents`: its manifest and the training dataset.

Training draws a fresh ``z = scale * (mean + exp(logvar / 2) * eps)`` from each stored posterior every epoch and picks
one of the stored views (the image or its flip) at random; the pixel-space mode stores uint8 images and flips them.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..cli import UsageError

__all__ = ["FORMAT_VERSION", "MANIFEST", "SHARD_DIR", "LatentDataset", "is_latent_dir", "read_manifest"]

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


def is_latent_dir(path: PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: PathLike) -> Dict[str, Any]:
    """The manifest of a complete extraction; a clear error otherwise."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        hint = " (extraction not finished: rerun it to complete)" if (path / SHARD_DIR).is_dir() else ""
        raise UsageError(f"{str(path)!r} is not a latent directory: no {MANIFEST}{hint}. Create one with "
                         "`python -m hcvision.data.latents --data-dir IMAGES --out DIR`")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise UsageError(f"{str(path)!r} has latent format {manifest.get('format')!r}; this version reads "
                         f"{FORMAT_VERSION}")
    return manifest


class LatentDataset(Dataset):
    """Samples ``(x, label)`` from an extracted directory, with fresh randomness each epoch.

    VAE mode: ``x = scale * (mean + exp(logvar / 2) * eps)`` of a view drawn uniformly (original / flipped when
    stored). Pixel mode: ``x`` = the image in [-1, 1], flipped with probability 1/2 if ``hflip``. The random draws
    of sample ``i`` in epoch ``e`` come from a generator seeded by ``(seed, e, i)``: independent of workers,
    ranks and where a resumed run restarts (exact resume). Shards are memory-mapped, opened lazily per process.
    """

    def __init__(self, root: PathLike, seed: int = 0, hflip: bool = True, sample_posterior: bool = True) -> None:
        from safetensors import safe_open

        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.pixel_mode = self.manifest["mode"] == "pixels"
        self.scale = float(self.manifest["scale_factor"])
        self.views = int(self.manifest["views"])
        self.classes: List[str] = list(self.manifest["classes"])
        self.sample_shape = tuple(self.manifest["sample_shape"])
        self.hflip, self.sample_posterior = bool(hflip), bool(sample_posterior)
        self.seed, self.epoch = int(seed), 0
        self.shards = self.manifest["shards"]
        self.starts = [s["start"] for s in self.shards]
        labels = []
        for s in self.shards:
            with safe_open(str(self.root / s["file"]), framework="pt") as f:
                labels.append(f.get_tensor("label"))
        self.targets = torch.cat(labels)
        self._handles: Dict[int, Any] = {}

    def __getstate__(self) -> Dict[str, Any]:  # open file handles do not cross into worker processes
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def _row(self, index: int, key: str) -> torch.Tensor:
        from safetensors import safe_open

        k = bisect.bisect_right(self.starts, index) - 1
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.root / self.shards[k]["file"]), framework="pt")
        row = index - self.shards[k]["start"]
        return self._handles[k].get_slice(key)[row: row + 1][0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]))
        flip = bool(torch.rand((), generator=g) < 0.5) if self.hflip else False
        label = int(self.targets[index])
        if self.pixel_mode:
            x = self._row(index, "pixels").float() / 127.5 - 1.0
            return (x.flip(-1) if flip else x), label
        moments = self._row(index, "moments").float()
        view = moments[1] if (flip and self.views > 1) else moments[0]
        mean, logvar = view.chunk(2, dim=0)
        if not self.sample_posterior:
            return self.scale * mean, label
        eps = torch.randn(mean.shape, generator=g)
        return self.scale * (mean + torch.exp(0.5 * logvar) * eps), label
