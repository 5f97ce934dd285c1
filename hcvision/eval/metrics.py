"""Generative metrics (FID, sFID, IS, precision/recall, KID, FD-DINOv2) on torch-fidelity, usable offline.

Feature extraction and every metric formula are torch-fidelity's; this module adds the inputs ADM/DiT pipelines
produce (``.npz`` sample batches, image folders, cached reference statistics, in-memory arrays), safe offline weight
loading (see :mod:`hcvision.eval.features` and :mod:`hcvision.eval.dinov2`) and one feature pass per extractor for all
metrics. As in ADM's evaluator, precision/recall use the *same* Inception pool features as FID, with k = 3 nearest
neighbours (torch-fidelity would otherwise switch to VGG16 for them), and sFID is the Fréchet distance on the first 7
channels of Inception's ``mixed_6/conv`` spatial features. FD-DINOv2 is the same distance on DINOv2 CLS features.

Every foreseeable problem (a bad file, array, count, label, weights file or option) raises
:class:`~hcvision.cli.UsageError` naming it, and is found before any feature is computed. The command line is
:mod:`hcvision.eval.generative`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from ..cli import UsageError
from ..io import PathLike
from ..outputs import check_writable
from .dinov2 import DINOV2_EXTRACTOR, resolve_dinov2_weights
from .features import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, SPATIAL_FEATURE, class_accuracy
from .npz import (
    FeatureStats,
    check_image_folder,
    is_stats_file,
    load_npz_samples,
    load_stats,
    save_stats,
    to_nhwc_uint8,
)

__all__ = [
    "DEFAULT_METRICS",
    "EXTRACTOR_ALIASES",
    "METRICS",
    "Metric",
    "MetricOptions",
    "GenerativeEvaluation",
    "UInt8ImageDataset",
    "check_output_path",
    "cls_acc",
    "compute_stats",
    "evaluate_generative",
    "frechet_distance",
    "generative_metrics",
    "metric_names",
    "metrics_from_stats",
    "save_reference_stats",
    "score_samples",
]

Source = Union[PathLike, np.ndarray, torch.Tensor, FeatureStats]

# User-facing names -> registered torch-fidelity extractors. "inception-v3-compat" is served by hcvision's
# safe-loading subclass (identical network and features). Other torch-fidelity extractors are not offered:
# they download code or weights at run time.
EXTRACTOR_ALIASES = {
    "inception-v3-compat": INCEPTION_EXTRACTOR,
    INCEPTION_EXTRACTOR: INCEPTION_EXTRACTOR,
    DIGITS_EXTRACTOR: DIGITS_EXTRACTOR,
}
DEFAULT_BATCH_SIZE = 64


class UInt8ImageDataset(Dataset):
    """In-memory uint8 NHWC images served as (C, H, W) uint8 tensors, the input torch-fidelity expects.

    Args:
        images: uint8 (N, H, W) or (N, H, W, C), C in {1, 3}.
        rgb: repeat grayscale to 3 channels (InceptionV3 requires RGB).
    """

    def __init__(self, images: np.ndarray, rgb: bool = True) -> None:
        self.images = to_nhwc_uint8(images)
        self.rgb = rgb

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        if self.rgb and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.contiguous()


# ------------------------------------------------------------------------------------------------
# Inputs and checks (all before any feature is computed)
# ------------------------------------------------------------------------------------------------
@dataclass
class _Input:
    """A resolved gen/ref input: a dataset of images or precomputed statistics (+ labels if known)."""

    dataset: Optional[Dataset]
    stats: Optional[FeatureStats]
    labels: Optional[np.ndarray]
    description: str

    @property
    def num_samples(self) -> int:
        return len(self.dataset) if self.dataset is not None else int(self.stats.num_samples)


def _resolve_input(source: Source, what: str) -> _Input:
    if isinstance(source, FeatureStats):
        return _Input(None, source, None, f"{what} statistics")
    if torch.is_tensor(source):
        if source.dtype != torch.uint8 or source.dim() != 4:
            raise UsageError(f"{what}: a tensor input must be uint8 (N, C, H, W), got {source.dtype} "
                             f"{tuple(source.shape)}")
        source = source.detach().cpu().permute(0, 2, 3, 1).numpy()
        return _Input(UInt8ImageDataset(to_nhwc_uint8(source, what)), None, None, f"{what} tensor")
    if isinstance(source, np.ndarray):
        return _Input(UInt8ImageDataset(to_nhwc_uint8(source, what)), None, None, f"{what} array")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            # torch-fidelity's dataset reads lazily and converts every file to RGB; one size is checked up front.
            return _Input(ImagesPathDataset([str(p) for p in check_image_folder(path)]), None, None, str(path))
        if path.is_file() and path.suffix == ".npz":
            if is_stats_file(path):
                return _Input(None, load_stats(path), None, str(path))
            images, labels = load_npz_samples(path)
            return _Input(UInt8ImageDataset(images), None, labels, str(path))
        raise UsageError(
            f"{what}: {str(path)!r} is neither an image folder nor an .npz file "
            "(ADM-style samples with 'arr_0', or statistics from save_reference_stats)"
            + ("" if path.exists() else "; it does not exist")
        )
    raise UsageError(
        f"{what}: unsupported input of type {type(source).__name__}; expected a folder, an .npz path, "
        "a uint8 NHWC numpy array, a uint8 NCHW torch tensor or FeatureStats"
    )


def _canonical_extractor(name: str) -> str:
    if name not in EXTRACTOR_ALIASES:
        raise UsageError(f"unknown feature_extractor {name!r}; accepted: {sorted(EXTRACTOR_ALIASES)}")
    return EXTRACTOR_ALIASES[name]


def _parse_device(device: Union[None, str, torch.device]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"device {device!r} is not available here ({torch.cuda.device_count()} CUDA devices); "
                         "use 'cpu'")
    return dev


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_output_path(path: PathLike, what: str = "output", suffix: Optional[str] = None) -> Path:
    """Refuse, before anything is computed, an output path that cannot be written: one that is a directory, lies
    under a regular file, or lacks the required suffix."""
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise UsageError(f"{what} {str(path)!r} must end with {suffix}")
    if path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory; accepted: a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {str(path)!r} lies under {str(parent)!r}, which is a file, not a directory")
            check_writable(path, what, is_dir=False)  # a probe: permission bits do not tell root or a read-only mount
            break
    return path


def _check_counts(n_gen: int, n_ref: Optional[int], chosen: Sequence[Metric], options: MetricOptions) -> None:
    """Sample counts every requested metric needs, named: a Fréchet distance or KID needs a covariance (>= 2)."""
    sets = [("gen", n_gen)] + ([("ref", n_ref)] if n_ref is not None else [])
    for m in chosen:
        if m.frechet or m.name == "kid":
            for which, n in sets:
                if n < 2:
                    raise UsageError(f"{m.title} needs at least 2 samples per set (a covariance), but {which} has "
                                     f"{n}; accepted: 2 or more (published numbers use 10K-50K)")
    names = {m.name for m in chosen}
    prc_k, isc_splits = options.prc_k, options.isc_splits
    if "prc" in names:
        if isinstance(prc_k, bool) or not isinstance(prc_k, int) or prc_k < 1:
            raise UsageError(f"prc_k={prc_k!r} is not valid; accepted: an integer >= 1 (ADM uses 3)")
        smallest = min(n for _, n in sets)
        if prc_k >= smallest:
            raise UsageError(f"precision/recall with prc_k={prc_k} needs more than {prc_k} samples per set, but the "
                             f"smaller set has {smallest}; accepted: prc_k in [1, {max(1, smallest - 1)}] or more "
                             "samples")
    if "isc" in names:
        if isinstance(isc_splits, bool) or not isinstance(isc_splits, int) or isc_splits < 1:
            raise UsageError(f"isc_splits={isc_splits!r} is not valid; accepted: an integer >= 1")
        if n_gen < isc_splits:
            raise UsageError(f"IS with {isc_splits} splits needs at least {isc_splits} generated samples, got "
                             f"{n_gen}; accepted: more samples or fewer splits")


_FEATURE_SETS = {"per_sample": ("features", "per-sample features (precision/recall, KID)"),
                 "logits": ("logits", "per-sample logits (IS, class accuracy)"),
                 "spatial": ("spatial", "sFID statistics"), "dinov2": ("dinov2", "DINOv2 statistics (FD-DINOv2)")}


def _check_stats_content(inp: _Input, which: str, needs: set[str]) -> None:
    s = inp.stats
    if s is None:
        return
    missing = [words for need, (attr, words) in _FEATURE_SETS.items() if need in needs and getattr(s, attr) is None]
    if missing:
        raise UsageError(f"{which} statistics {inp.description!r} hold no {' and no '.join(missing)}; recompute them "
                         "with save_reference_stats (CLI --write-ref-stats) and the same metric options")


def _check_labels(labels: Optional[np.ndarray], n_gen: int, num_classes: Optional[int]) -> Optional[np.ndarray]:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n_gen,) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"gen labels have dtype {labels.dtype} shape {labels.shape}; accepted: ({n_gen},) integer "
                         "labels, one per generated image")
    if num_classes is not None and n_gen and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(f"gen labels lie in [{labels.min()}, {labels.max()}]; the classifier knows classes "
                         f"0..{num_classes - 1}")
    return labels


# ------------------------------------------------------------------------------------------------
# Extractors
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _on_device(dev: torch.device) -> Iterator[bool]:
    """torch-fidelity only knows ``cuda=True/False`` (the current CUDA device); select ``cuda:N`` around it."""
    if dev.type == "cuda":
        with torch.cuda.device(dev.index if dev.index is not None else torch.cuda.current_device()):
            yield True
    else:
        yield False


def _moments(features: np.ndarray, extractor: str, sha: str, keep: bool,
             logits: Optional[np.ndarray] = None) -> FeatureStats:
    m = fid_features_to_statistics(torch.from_numpy(features))
    return FeatureStats(mu=np.asarray(m["mu"], dtype=np.float64), sigma=np.asarray(m["sigma"], dtype=np.float64),
                        feature_extractor=extractor, weights_sha256=sha, num_samples=int(features.shape[0]),
                        features=features if keep else None, logits=logits)


class _Extractor:
    """One torch-fidelity feature extractor instance plus the layers each metric reads."""

    def __init__(self, name: str, layers: dict[str, str], weights_path: Optional[PathLike], device: torch.device,
                 batch_size: int, verbose: bool, extra: dict[str, Any]) -> None:
        self.name, self.layers, self.device = name, layers, device
        self.batch_size, self.verbose = batch_size, verbose
        with _on_device(device) as cuda:
            self.module = create_feature_extractor(
                name, sorted(set(layers.values())), cuda=cuda,
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
                verbose=verbose, **extra,
            )
        self.weights_sha256 = getattr(self.module, "weights_sha256", "")

    def features(self, dataset: Dataset) -> dict[str, np.ndarray]:
        with _on_device(self.device) as cuda:
            # save_cpu_ram=True only means num_workers=0 here: no worker processes fighting for CPU cores.
            feats = get_featuresdict_from_dataset(dataset, self.module, self.batch_size, cuda, True, self.verbose)
        return {k: v.numpy().astype(np.float32) for k, v in feats.items()}

    def check(self, stats: FeatureStats, description: str, feature_set: str = "") -> None:
        """Refuse statistics computed with another extractor or other weights of it."""
        what = f"{description}{f' ({feature_set})' if feature_set else ''}"
        if stats.feature_extractor != self.name and not stats.feature_extractor.startswith(f"{self.name}:"):
            raise UsageError(f"{what}: statistics were computed with {stats.feature_extractor!r}, but the evaluation "
                             f"uses {self.name!r}")
        if stats.weights_sha256 and self.weights_sha256 and stats.weights_sha256 != self.weights_sha256:
            raise UsageError(f"{what}: statistics were computed with different {self.name} weights (sha256 "
                             f"{stats.weights_sha256[:12]}... vs {self.weights_sha256[:12]}...); recompute them with "
                             "these weights or pass the weights they were made with")


@dataclass
class _Extractors:
    main: Optional[_Extractor]  # None when only FD-DINOv2 is asked for
    dinov2: Optional[_Extractor] = None

    def sha256s(self) -> dict[str, str]:
        return {e.name: e.weights_sha256 for e in (self.main, self.dinov2) if e is not None}


def _make_extractors(feature_extractor: str, weights_path: Optional[PathLike], device: Any,
                     batch_size: Optional[int], need_logits: bool, verbose: bool, model_name: Optional[str], *,
                     sfid: bool = False, fd_dinov2: bool = False, dinov2_weights: Optional[PathLike] = None,
                     dinov2_model: Optional[str] = None, need_main: bool = True) -> _Extractors:
    name = _canonical_extractor(feature_extractor)
    _check_batch_size(batch_size)
    if sfid and name != INCEPTION_EXTRACTOR:
        raise UsageError(f"sFID is defined on Inception's mixed_6/conv features; feature_extractor={name!r} has "
                         f"none (accepted with sfid: {INCEPTION_EXTRACTOR!r} / 'inception-v3-compat')")
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    # One extractor and one explicit layer per metric, so torch-fidelity never substitutes VGG16 for PRC.
    layers = {m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "prc", "kid")}
    if len(set(layers.values())) != 1:
        raise RuntimeError(f"{name}: FID, precision/recall and KID must share one feature layer, got {layers}")
    if need_logits:
        layers["isc"] = cls.get_default_feature_layer_for_metric("isc")
    if sfid:
        layers["sfid"] = SPATIAL_FEATURE
    dev = _parse_device(device)
    bs = batch_size or DEFAULT_BATCH_SIZE
    if fd_dinov2:  # the cheap check of a missing file before the slow load of another extractor
        dinov2_weights = resolve_dinov2_weights(dinov2_weights)
    main = None
    if need_main:
        extra = {"digits_model_name": model_name} if name == DIGITS_EXTRACTOR and model_name else {}
        main = _Extractor(name, layers, weights_path, dev, bs, verbose, extra)
    dino = None
    if fd_dinov2:
        dino = _Extractor(DINOV2_EXTRACTOR, {"fid": "cls"}, dinov2_weights, dev, bs, verbose,
                          {"dinov2_model": dinov2_model} if dinov2_model else {})
    return _Extractors(main, dino)


def _compute(ex: _Extractors, dataset: Dataset, *, keep_features: bool) -> FeatureStats:
    """Every requested feature set of one image set: one pass per extractor. Without a main extractor (FD-DINOv2
    alone) the DINOv2 statistics are also the main ones."""
    dino = None
    if ex.dinov2 is not None:
        d = ex.dinov2
        dino = _moments(d.features(dataset)["cls"], d.name, d.weights_sha256, False)
    if ex.main is None:
        return FeatureStats(dino.mu, dino.sigma, dino.feature_extractor, dino.weights_sha256, dino.num_samples,
                            dinov2=dino)
    m = ex.main
    feats = m.features(dataset)
    stats = _moments(feats[m.layers["fid"]], m.name, m.weights_sha256, keep_features,
                     feats.get(m.layers["isc"]) if "isc" in m.layers else None)
    if "sfid" in m.layers:
        stats.spatial = _moments(feats[SPATIAL_FEATURE], f"{m.name}:{SPATIAL_FEATURE}", m.weights_sha256, False)
    stats.dinov2 = dino
    return stats


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, Eq. 6), torch-fidelity's code.

    FID, sFID and FD-DINOv2 are this distance on different features."""
    if a.mu.shape != b.mu.shape:
        raise UsageError(f"feature dimensions differ ({a.mu.shape[0]} vs {b.mu.shape[0]}): statistics of "
                         f"{a.feature_extractor!r} and {b.feature_extractor!r} cannot be compared")
    as_stats = lambda s: {"mu": np.asarray(s.mu, np.float64), "sigma": np.asarray(s.sigma, np.float64)}  # noqa: E731
    return float(fid_statistics_to_metric(as_stats(a), as_stats(b), False)[KEY_METRIC_FID])


@dataclass(frozen=True)
class MetricOptions:
    """The metrics' own parameters (torch-fidelity's names and defaults; ADM's k = 3 for precision/recall)."""

    prc_k: int = 3
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 2020


def _fid(gen: FeatureStats, ref: FeatureStats, o: MetricOptions) -> dict[str, float]:
    return {"fid": frechet_distance(gen, ref)}


def _sfid(gen: FeatureStats, ref: FeatureStats, o: MetricOptions) -> dict[str, float]:
    return {"sfid": frechet_distance(gen.spatial, ref.spatial)}


def _fd_dinov2(gen: FeatureStats, ref: FeatureStats, o: MetricOptions) -> dict[str, float]:
    return {"fd_dinov2": frechet_distance(gen.dinov2, ref.dinov2)}


def _isc(gen: FeatureStats, ref: Optional[FeatureStats], o: MetricOptions) -> dict[str, float]:
    r = isc_features_to_metric(torch.from_numpy(np.asarray(gen.logits)), o.isc_splits, True, o.seed)
    return {"is_mean": r[KEY_METRIC_ISC_MEAN], "is_std": r[KEY_METRIC_ISC_STD]}


def _per_sample(gen: FeatureStats, ref: FeatureStats) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.asarray(gen.features, np.float32)),
            torch.from_numpy(np.asarray(ref.features, np.float32)))


def _prc(gen: FeatureStats, ref: FeatureStats, o: MetricOptions) -> dict[str, float]:
    r = prc_features_to_metric(*_per_sample(gen, ref), prc_neighborhood=o.prc_k, prc_batch_size=10000,
                               save_cpu_ram=False, verbose=False)
    return {"precision": r[KEY_METRIC_PRECISION], "recall": r[KEY_METRIC_RECALL]}


def _kid(gen: FeatureStats, ref: FeatureStats, o: MetricOptions) -> dict[str, float]:
    f_gen, f_ref = _per_sample(gen, ref)
    size = min(o.kid_subset_size, len(f_gen), len(f_ref))  # subsets capped at the samples there are
    r = kid_features_to_metric(f_gen, f_ref, kid_subsets=o.kid_subsets, kid_subset_size=size, rng_seed=o.seed,
                               verbose=False)
    return {"kid_mean": r[KEY_METRIC_KID_MEAN], "kid_std": r[KEY_METRIC_KID_STD]}


@dataclass(frozen=True)
class Metric:
    """One metric: what it reads and how it is computed. Everything else (the checks, which features a pass
    extracts and keeps, the CLI's flags) derives from :data:`METRICS`."""

    name: str  # what callers request (and the CLI flag: --NAME, or --no-NAME for a default one)
    title: str  # in messages
    needs: str  # the feature set read: "pool" (moments), "per_sample" (features), "logits", "spatial", "dinov2"
    reference: bool  # compares against a reference set
    default: bool  # computed unless the caller names the metrics
    compute: Callable[[FeatureStats, Optional[FeatureStats], MetricOptions], dict[str, float]]
    help: str

    @property
    def frechet(self) -> bool:  # needs a covariance: 2 samples or more per set
        return self.needs in ("pool", "spatial", "dinov2")


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fid", "FID", "pool", True, True, _fid, "Fréchet Inception distance (Heusel et al. 2017)"),
    Metric("isc", "IS", "logits", False, True, _isc, "Inception score (mean and std over isc_splits splits)"),
    Metric("prc", "precision/recall", "per_sample", True, True, _prc,
           "precision and recall (Kynkäänniemi et al. 2019; k = prc_k, on the FID features as ADM)"),
    Metric("kid", "KID", "per_sample", True, False, _kid, "kernel Inception distance (Bińkowski et al. 2018)"),
    Metric("sfid", "sFID", "spatial", True, False, _sfid,
           "sFID: Fréchet distance on Inception's mixed_6/conv features (ADM; needs the Inception extractor)"),
    Metric("fd_dinov2", "FD-DINOv2", "dinov2", True, False, _fd_dinov2,
           "Fréchet distance on DINOv2 CLS features (Stein et al. 2023; needs DINOv2 weights)"),
)}
DEFAULT_METRICS: tuple[str, ...] = tuple(name for name, m in METRICS.items() if m.default)


def _check_metrics(metrics: Sequence[str]) -> list[Metric]:
    """The table's entries for ``metrics`` (names, in table order); an unknown name or none is a UsageError."""
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UsageError(f"metrics={list(metrics)!r} is not valid; accepted: one or more of {', '.join(METRICS)}")
    return [m for name, m in METRICS.items() if name in metrics]


def metric_names(**flags: bool) -> list[str]:
    """The metric names meant by per-metric flags (``fid=True, isc=False, kid=True``; a flag left out keeps the
    table's default): the keyword form of :func:`generative_metrics` and :func:`score_samples`."""
    unknown = sorted(set(flags) - set(METRICS))
    if unknown:
        raise UsageError(f"unknown metric flag(s) {unknown}; accepted: {', '.join(METRICS)}")
    return [name for name, m in METRICS.items() if flags.get(name, m.default)]


def metrics_from_stats(gen: FeatureStats, ref: Optional[FeatureStats], metrics: Sequence[str] = DEFAULT_METRICS,
                       options: MetricOptions = MetricOptions()) -> dict[str, float]:
    """The ``metrics`` (names of :data:`METRICS`) of features/statistics, with torch-fidelity's formulas.

    Precision is the share of generated samples inside the reference manifold, recall the share of reference
    samples inside the generated manifold (k-NN balls, ``prc_k`` neighbours, ADM/Kynkäänniemi et al.).
    KID subsets are capped at the number of available samples. ``sfid`` and ``fd_dinov2`` read the ``spatial`` and
    ``dinov2`` statistics of both sets.
    """
    chosen = _check_metrics(metrics)
    if any(m.reference for m in chosen) and ref is None:
        raise UsageError("a reference set (ref) is required for "
                         + ", ".join(m.title for m in chosen if m.reference) + " (only IS works without it)")
    _check_counts(gen.num_samples, None if ref is None else ref.num_samples, chosen, options)
    for s, which in ((gen, "gen"), (ref, "ref")):
        if s is not None:
            _check_stats_content(_Input(None, s, None, which), which, _needs(chosen, ref=which == "ref"))
    out: dict[str, float] = {}
    for m in chosen:
        out.update(m.compute(gen, ref, options))
    return out


def _needs(chosen: Sequence[Metric], *, ref: bool = False, logits: bool = False) -> set[str]:
    """The feature sets ``chosen`` read from one set (a reference set gives no logits)."""
    need = {m.needs for m in chosen if not (ref and m.needs == "logits")}
    return need | ({"logits"} if logits and not ref else set())


@dataclass
class GenerativeEvaluation:
    """What :func:`evaluate_generative` measured and on what: the metrics, the sample counts and each extractor's
    weights SHA-256 (for :func:`hcvision.eval.provenance_fields`)."""

    metrics: dict[str, float]
    num_samples: int
    num_ref_samples: Optional[int]
    extractors: dict[str, str] = field(default_factory=dict)


def evaluate_generative(
    gen: Source,
    ref: Optional[Source] = None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    feature_extractor: str = "inception-v3-compat",
    weights_path: Optional[PathLike] = None,
    dinov2_weights: Optional[PathLike] = None,
    dinov2_model: Optional[str] = None,
    options: MetricOptions = MetricOptions(),
    gen_labels: Optional[Sequence[int]] = None,
    model_name: Optional[str] = None,
    save_ref_stats: Optional[PathLike] = None,
    batch_size: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    verbose: bool = False,
) -> GenerativeEvaluation:
    """The ``metrics`` (names of :data:`METRICS`) of ``gen`` against ``ref``, plus sample counts and extractor
    fingerprints; ``save_ref_stats=PATH`` also saves the reference's statistics (with per-sample features) once they
    are computed. See :func:`generative_metrics` for the arguments."""
    chosen = _check_metrics(metrics)
    need_ref = any(m.reference for m in chosen)
    if need_ref and ref is None:
        raise UsageError("ref is required for " + ", ".join(m.title for m in chosen if m.reference)
                         + " (only IS works without it)")
    name = _canonical_extractor(feature_extractor)
    device = _parse_device(device)
    _check_batch_size(batch_size)
    if save_ref_stats is not None:
        check_output_path(save_ref_stats, "reference statistics path", ".npz")
    # 1) inputs: files, arrays, counts and what cached statistics hold
    gen_in = _resolve_input(gen, "gen")
    ref_in = _resolve_input(ref, "ref") if need_ref else None
    if save_ref_stats is not None and (ref_in is None or ref_in.dataset is None):
        raise UsageError("save_ref_stats needs reference images (a folder, an ADM .npz or an array), not statistics")
    labels = gen_labels if gen_labels is not None else gen_in.labels
    want_acc = labels is not None and name == DIGITS_EXTRACTOR
    if gen_labels is not None and not want_acc:
        raise UsageError(f"gen_labels are only used for class accuracy with feature_extractor={DIGITS_EXTRACTOR!r}")
    labels = _check_labels(labels, gen_in.num_samples, None) if want_acc else None
    _check_counts(gen_in.num_samples, ref_in.num_samples if ref_in else None, chosen, options)
    needs = _needs(chosen, logits=want_acc)
    _check_stats_content(gen_in, "gen", needs)
    if ref_in is not None:
        _check_stats_content(ref_in, "ref", _needs(chosen, ref=True))
    # 2) weights: every extractor is built (and its file validated) before any image is processed
    need_main = bool(needs - {"dinov2"}) or save_ref_stats is not None
    ex = _make_extractors(name, weights_path, device, batch_size, "logits" in needs, verbose, model_name,
                          sfid="spatial" in needs, fd_dinov2="dinov2" in needs, dinov2_weights=dinov2_weights,
                          dinov2_model=dinov2_model, need_main=need_main)
    if want_acc:
        _check_labels(labels, gen_in.num_samples, getattr(ex.main.module, "num_classes", None))
    for inp in (gen_in, ref_in):
        if inp is not None and inp.stats is not None:
            if ex.main is not None:
                ex.main.check(inp.stats, inp.description)
            if "spatial" in needs:
                ex.main.check(inp.stats.spatial, inp.description, "sFID")
            if "dinov2" in needs:
                ex.dinov2.check(inp.stats.dinov2, inp.description, "FD-DINOv2")
    # 3) features, then metrics
    keep = "per_sample" in needs
    gen_stats = gen_in.stats if gen_in.stats is not None else _compute(ex, gen_in.dataset, keep_features=keep)
    ref_stats = None
    if ref_in is not None:
        if ref_in.stats is not None:
            ref_stats = ref_in.stats
        else:
            ref_stats = _compute(ex, ref_in.dataset, keep_features=keep or save_ref_stats is not None)
            if save_ref_stats is not None:
                save_stats(save_ref_stats, ref_stats)
    out = metrics_from_stats(gen_stats, ref_stats, [m.name for m in chosen], options)
    if want_acc:
        out["cls_acc"] = class_accuracy(torch.from_numpy(gen_stats.logits), torch.as_tensor(labels))
    return GenerativeEvaluation(out, gen_in.num_samples, ref_in.num_samples if ref_in else None, ex.sha256s())


def generative_metrics(gen: Source, ref: Optional[Source] = None, **kwargs: Any) -> dict[str, float]:
    """FID, IS, precision/recall (and KID, sFID, FD-DINOv2) of generated images against a reference set.

    Args:
        gen, ref: an image folder (png/jpg, one size), an ADM-style ``.npz`` (``arr_0`` uint8 NHWC), statistics
            written by :func:`save_reference_stats` (an ``.npz`` with ``mu``/``sigma``), a uint8 NHWC numpy array, a
            uint8 NCHW torch tensor, or :class:`~hcvision.eval.npz.FeatureStats`. An ADM reference batch (``arr_0``
            plus TF-computed ``mu``/``sigma``) is read as images: its moments come from another Inception port.
        metrics: names of :data:`METRICS` (default: fid, isc, prc); or per-metric flags ``fid=``, ``isc=``,
            ``prc=``, ``kid=``, ``sfid=``, ``fd_dinov2=`` (a flag left out keeps the table's default).
        sfid: ADM's sFID: the Fréchet distance on the first 7 channels of Inception's ``mixed_6/conv`` (17x17)
            features, flattened (2023 dims). Needs the Inception extractor.
        fd_dinov2: Fréchet distance on DINOv2 CLS features (dgm-eval's preprocessing, :mod:`hcvision.eval.dinov2`),
            weights from ``dinov2_weights`` (or ``$HCV_DINOV2_WEIGHTS``); ``dinov2_model`` names the timm ViT when the
            file does not.
        feature_extractor: ``"inception-v3-compat"`` (standard, default) or ``"hcv-digits"``; one extractor
            serves FID, IS, precision/recall and KID.
        weights_path: the extractor's weights. Inception: else ``$HCV_INCEPTION_WEIGHTS``, else the torch hub
            cache/download. Digits: else ``$HCV_DIGITS_CLASSIFIER``, else
            ``weights/vit_digits_patch2_8_res.hcv_digits.safetensors``.
        gen_labels: requested classes of the generated samples (defaults to ``arr_1`` of a gen ``.npz``); with
            ``hcv-digits`` the result then includes ``cls_acc``.
        model_name: timm name of the digits classifier, if its file does not record it.
        prc_k (3), isc_splits (10), kid_subsets, kid_subset_size, seed: :class:`MetricOptions` (or ``options=``).
        batch_size, device, verbose: as named.

    Returns:
        ``fid``, ``sfid``, ``fd_dinov2``, ``is_mean``, ``is_std``, ``precision``, ``recall``, ``kid_mean``,
        ``kid_std`` (those requested) and ``cls_acc`` as described above.

    Raises:
        UsageError: a bad input, count, label, option or weights file, found before any feature is computed.
    """
    flags = {k: kwargs.pop(k) for k in list(kwargs) if k in METRICS}
    option_names = {f.name for f in dataclasses.fields(MetricOptions)}
    options = MetricOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in option_names})
    if flags and "metrics" in kwargs:
        raise UsageError(f"give either metrics= or per-metric flags ({', '.join(flags)}), not both")
    metrics = kwargs.pop("metrics", None) or metric_names(**flags)
    return evaluate_generative(gen, ref, metrics=metrics, options=options, **kwargs).metrics


def score_samples(images: np.ndarray, labels: np.ndarray, reference: str = "digits",
                  classifier: Optional[PathLike] = None) -> dict[str, Any]:
    """What ``train_dit.py`` reports for its samples (uint8 NHWC, requested ``labels``): FID, IS, precision and recall
    against ``reference``, which is ``"digits"`` (the held-out digits in ``hcv-digits`` features of ``classifier``,
    plus ``cls_acc``) or reference images / an ``.npz`` / statistics (Inception features). Adds ``reference``."""
    if reference == "digits":
        from ..data.digits import digits_pixels
        from .features import digits_to_uint8

        ref = digits_to_uint8((digits_pixels("val").images + 1.0) * 8.0)  # [-1, 1] -> sklearn's 0..16
        scores = generative_metrics(images, ref.permute(0, 2, 3, 1).numpy(), feature_extractor=DIGITS_EXTRACTOR,
                                    weights_path=classifier, gen_labels=labels, metrics=DEFAULT_METRICS)
        return {**scores, "reference": "digits held-out split"}
    return {**generative_metrics(images, reference, metrics=DEFAULT_METRICS), "reference": reference}


def compute_stats(
    source: Source,
    *,
    feature_extractor: str = "inception-v3-compat",
    weights_path: Optional[PathLike] = None,
    include_features: bool = True,
    include_logits: bool = False,
    sfid: bool = False,
    fd_dinov2: bool = False,
    dinov2_weights: Optional[PathLike] = None,
    dinov2_model: Optional[str] = None,
    batch_size: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    model_name: Optional[str] = None,
    verbose: bool = False,
) -> FeatureStats:
    """Features and moments of one image set (see :func:`generative_metrics` for the arguments); ``sfid`` and
    ``fd_dinov2`` add the ``spatial`` and ``dinov2`` statistics."""
    inp = _resolve_input(source, "source")
    if inp.dataset is None:
        raise UsageError(f"{inp.description} already holds statistics; compute_stats needs images")
    if inp.num_samples < 2:
        raise UsageError(f"{inp.description} holds {inp.num_samples} image; statistics (a covariance) need at least 2")
    ex = _make_extractors(feature_extractor, weights_path, device, batch_size, include_logits, verbose, model_name,
                          sfid=sfid, fd_dinov2=fd_dinov2, dinov2_weights=dinov2_weights, dinov2_model=dinov2_model)
    return _compute(ex, inp.dataset, keep_features=include_features)


def save_reference_stats(source: Source, path: PathLike, **kwargs: Any) -> FeatureStats:
    """Compute and atomically save reference statistics (``.npz``) usable as ``ref`` later.

    The file holds ``mu``, ``sigma``, per-sample ``features`` (unless ``include_features=False``; they are
    needed for precision/recall and KID), the extractor name and the SHA-256 of its weights, which are
    checked when the file is used; with ``sfid=True`` / ``fd_dinov2=True`` also the sFID and DINOv2 statistics, each
    with its extractor's weights SHA-256. Keyword arguments are those of :func:`compute_stats`.
    """
    check_output_path(path, "reference statistics path", ".npz")
    stats = compute_stats(source, **kwargs)
    save_stats(path, stats)
    return stats


def cls_acc(
    images: Source,
    labels: Optional[Sequence[int]] = None,
    *,
    weights_path: Optional[PathLike] = None,
    model_name: Optional[str] = None,
    batch_size: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
) -> float:
    """Share of generated digits the ``hcv-digits`` classifier assigns to their requested class.

    ``labels`` defaults to ``arr_1`` when ``images`` is an ADM-style ``.npz``.
    """
    inp = _resolve_input(images, "images")
    if inp.dataset is None:
        raise UsageError("cls_acc needs images, not statistics")
    labels = np.asarray(labels) if labels is not None else inp.labels
    if labels is None:
        raise UsageError("cls_acc needs labels (argument, or arr_1 in the .npz)")
    labels = _check_labels(labels, inp.num_samples, None)
    ex = _make_extractors(DIGITS_EXTRACTOR, weights_path, device, batch_size, True, False, model_name)
    _check_labels(labels, inp.num_samples, getattr(ex.main.module, "num_classes", None))
    logits = ex.main.features(inp.dataset)[ex.main.layers["isc"]]
    return class_accuracy(torch.from_numpy(logits), torch.as_tensor(labels))
