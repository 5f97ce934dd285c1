"""Image-set and statistics files for generative evaluation.

Three on-disk forms are understood:

* **ADM sample batches** (``.npz``): ``arr_0`` holds uint8 images in NHWC layout, as written by ADM's and
  DiT's sampling scripts and read by ADM's evaluator; an optional ``arr_1`` holds integer class labels.
* **Image folders**: ``.png`` / ``.jpg`` / ``.jpeg`` files directly inside a directory, read in sorted
  file-name order and converted to RGB.
* **Reference statistics** (``.npz``, written by :func:`save_stats`): the FID moments ``mu`` / ``sigma``
  of one image set, optionally its per-sample ``features`` (needed for precision/recall and KID) and
  ``logits``, plus the feature extractor's name and a fingerprint of its weights so statistics are
  never silently compared across different extractors.

Every file is read with ``allow_pickle=False`` and written through :func:`hcvision.io.atomic_write`. Bad files and
arrays raise :class:`~hcvision.cli.UsageError` naming the file and what is accepted.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..cli import UsageError
from ..io import PathLike, atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "STATS_FORMAT",
    "FeatureStats",
    "is_stats_file",
    "list_image_files",
    "load_image_folder",
    "load_npz_samples",
    "load_stats",
    "save_npz_samples",
    "save_stats",
    "to_nhwc_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
STATS_FORMAT = "hcvision-feature-stats-v1"
# Auxiliary feature sets a statistics file may hold next to the main one, stored under "<name>__<field>" keys.
AUX_STATS = ("spatial", "dinov2")


class _SafeNpz:
    """An open ``.npz`` whose arrays are read with ``allow_pickle=False``; an array of Python objects (a pickle) is a
    one-line :class:`UsageError` naming the file and the array, not numpy's ``ValueError``."""

    def __init__(self, npz: Any, path: PathLike) -> None:
        self._npz, self.path, self.files = npz, path, npz.files

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._npz[key]
        except ValueError as err:
            if "allow_pickle" not in str(err):
                raise
            raise UsageError(f"{str(self.path)!r}: array {key!r} holds Python objects (a pickle), which are never "
                             "loaded; accepted: numeric arrays (uint8 NHWC images in arr_0, integer labels in "
                             "arr_1, float statistics)") from None

    def __enter__(self) -> "_SafeNpz":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._npz.close()


def open_npz(path: PathLike, what: str = "file") -> Any:
    """``np.load(path, allow_pickle=False)`` with a one-line :class:`UsageError` for a missing or non-npz file, or
    an array of objects."""
    try:
        return _SafeNpz(np.load(path, allow_pickle=False), path)
    except FileNotFoundError:
        raise UsageError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UsageError(f"{what} {str(path)!r} is not a readable .npz file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}); accepted: an ADM-style sample batch "
                         "or hcvision statistics") from None


def _save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def to_nhwc_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate an image array and return it as uint8 NHWC with 1 or 3 channels.

    Accepted: uint8 arrays shaped (N, H, W) (grayscale) or (N, H, W, C) with C in {1, 3}.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UsageError(f"{what}: expected dtype uint8 (values 0..255), got {images.dtype}; convert with "
                         "np.clip(x, 0, 255).round().astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UsageError(
            f"{what}: expected shape (N, H, W) or (N, H, W, C) with C in (1, 3) (NHWC, as in ADM's .npz), "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise UsageError(f"{what}: the image set is empty; accepted: at least one image")
    return np.ascontiguousarray(images)


def save_npz_samples(path: PathLike, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Path:
    """Write an ADM-style sample batch: ``arr_0`` uint8 NHWC images (+ ``arr_1`` int64 labels)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"sample batch path must end with .npz, got {str(path)!r}")
    images = to_nhwc_uint8(images)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(
                f"labels: expected an integer array of shape ({images.shape[0]},), "
                f"got dtype {labels.dtype} shape {tuple(labels.shape)}"
            )
        arrays["arr_1"] = labels.astype(np.int64)
    return _save_npz(path, arrays)


def load_npz_samples(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an ADM-style sample batch; returns (uint8 NHWC images, labels or None)."""
    with open_npz(path, "sample batch") as data:
        if "arr_0" not in data.files:
            raise UsageError(
                f"{str(path)!r} is not an ADM-style sample batch: it has keys {sorted(data.files)}, "
                "expected 'arr_0' (uint8 NHWC images) and optionally 'arr_1' (labels)"
            )
        images = to_nhwc_uint8(data["arr_0"], what=f"{path}:arr_0")
        labels = data["arr_1"] if "arr_1" in data.files else None
    if labels is not None and (labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer)):
        raise UsageError(f"{path}:arr_1 has dtype {labels.dtype} shape {labels.shape}; accepted: "
                         f"({images.shape[0]},) integer labels, one per image in arr_0")
    return images, labels


def list_image_files(folder: PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), in sorted name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{str(folder)!r} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"no images with extensions {IMAGE_EXTENSIONS} found in {str(folder)!r}")
    return files


def check_image_folder(folder: PathLike) -> list[Path]:
    """The folder's image files, after checking that each opens and that all share one size (headers only, so no
    pixels are decoded): a batch of mixed sizes cannot be stacked."""
    from PIL import Image, UnidentifiedImageError

    files = list_image_files(folder)
    first: Optional[tuple[Path, tuple[int, int]]] = None
    for f in files:
        try:
            with Image.open(f) as im:
                size = im.size
        except (OSError, UnidentifiedImageError) as err:
            raise UsageError(f"image {str(f)!r} cannot be read ({type(err).__name__}); accepted: PNG or JPEG files"
                             ) from None
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise UsageError(f"images in {str(folder)!r} have different sizes: {first[0].name} is "
                             f"{first[1][0]}x{first[1][1]}, {f.name} is {size[0]}x{size[1]}; accepted: one size "
                             "for all images (resize them first)")
    return files


def load_image_folder(folder: PathLike) -> np.ndarray:
    """Read every image of a folder as uint8 RGB NHWC (all images must share one size)."""
    from PIL import Image

    arrays = []
    for f in check_image_folder(folder):
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(arrays)


@dataclass
class FeatureStats:
    """Statistics of one image set under one feature extractor.

    Attributes:
        mu: mean feature vector (D,), float64.
        sigma: feature covariance (D, D), float64 (``np.cov`` with N-1 normalisation, as in FID).
        feature_extractor: registered name of the extractor that produced the features.
        weights_sha256: SHA-256 of the extractor's weights file ("" if unknown).
        num_samples: number of images the statistics were computed from.
        features: per-sample features (N, D) or None (then precision/recall/KID are unavailable).
        logits: per-sample classifier logits (N, K) or None (then IS is unavailable).
        spatial: statistics of Inception's ``mixed_6/conv`` spatial features (sFID), or None.
        dinov2: statistics of DINOv2 features (FD-DINOv2), or None.
    """

    mu: np.ndarray
    sigma: np.ndarray
    feature_extractor: str
    weights_sha256: str
    num_samples: int
    features: Optional[np.ndarray] = None
    logits: Optional[np.ndarray] = None
    spatial: Optional["FeatureStats"] = field(default=None, repr=False)
    dinov2: Optional["FeatureStats"] = field(default=None, repr=False)


def is_stats_file(path: PathLike) -> bool:
    """True if ``path`` is an ``.npz`` holding FID moments (``mu``/``sigma``) and no ``arr_0`` images."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".npz"):
        return False
    with open_npz(path) as data:
        return "mu" in data.files and "sigma" in data.files and "arr_0" not in data.files


def _stats_arrays(stats: FeatureStats, prefix: str = "") -> Dict[str, np.ndarray]:
    arrays = {
        f"{prefix}mu": np.asarray(stats.mu, dtype=np.float64),
        f"{prefix}sigma": np.asarray(stats.sigma, dtype=np.float64),
        f"{prefix}feature_extractor": np.array(stats.feature_extractor),
        f"{prefix}weights_sha256": np.array(stats.weights_sha256),
        f"{prefix}num_samples": np.array(stats.num_samples, dtype=np.int64),
    }
    if stats.features is not None:
        arrays[f"{prefix}features"] = np.asarray(stats.features, dtype=np.float32)
    if stats.logits is not None:
        arrays[f"{prefix}logits"] = np.asarray(stats.logits, dtype=np.float32)
    return arrays


def save_stats(path: PathLike, stats: FeatureStats) -> Path:
    """Write ``stats`` (and its sFID / DINOv2 statistics, if any) atomically to an ``.npz``; strings are stored as
    unicode scalars so no pickle is needed."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"statistics path must end with .npz, got {str(path)!r}")
    arrays = {"format": np.array(STATS_FORMAT), **_stats_arrays(stats)}
    for name in AUX_STATS:
        aux = getattr(stats, name)
        if aux is not None:
            arrays.update(_stats_arrays(aux, f"{name}__"))
    return _save_npz(path, arrays)


def _read_stats(data: Any, path: PathLike, prefix: str = "") -> FeatureStats:
    get = lambda key: data[f"{prefix}{key}"] if f"{prefix}{key}" in data.files else None  # noqa: E731
    where = f"{str(path)!r}" + (f" ({prefix[:-2]} statistics)" if prefix else "")
    missing = [k for k in ("mu", "sigma", "feature_extractor", "weights_sha256", "num_samples") if get(k) is None]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}; write statistics with "
                         "hcvision.eval.save_reference_stats")
    stats = FeatureStats(
        mu=get("mu").astype(np.float64),
        sigma=get("sigma").astype(np.float64),
        feature_extractor=str(get("feature_extractor")),
        weights_sha256=str(get("weights_sha256")),
        num_samples=int(get("num_samples")),
        features=get("features"),
        logits=get("logits"),
    )
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    if d < 0 or stats.sigma.shape != (d, d):
        raise UsageError(f"{where}: inconsistent shapes mu {stats.mu.shape}, sigma {stats.sigma.shape}")
    if stats.features is not None and stats.features.shape != (stats.num_samples, d):
        raise UsageError(f"{where}: features have shape {stats.features.shape}, expected ({stats.num_samples}, {d})")
    if stats.logits is not None and (stats.logits.ndim != 2 or stats.logits.shape[0] != stats.num_samples):
        raise UsageError(f"{where}: logits have shape {stats.logits.shape}, expected ({stats.num_samples}, classes)")
    return stats


def load_stats(path: PathLike) -> FeatureStats:
    """Read statistics written by :func:`save_stats` (validates format and shapes)."""
    with open_npz(path, "statistics file") as data:
        fmt = str(data["format"]) if "format" in data.files else None
        if fmt != STATS_FORMAT:
            raise UsageError(
                f"{str(path)!r} is not an hcvision statistics file (format={fmt!r}, expected {STATS_FORMAT!r}); "
                "write one with hcvision.eval.save_reference_stats"
            )
        stats = _read_stats(data, path)
        for name in AUX_STATS:
            if f"{name}__mu" in data.files:
                setattr(stats, name, _read_stats(data, path, f"{name}__"))
    return stats
