"""Image data sources through timm's dataset factory: a local folder, WebDataset shards (``wds/``) and Hugging Face
datasets (``hfds/``), named the way timm's ``create_dataset`` names them.

``data_dir=`` (train_cls.py; the issue's ``data=``) and ``--data-dir`` (latent extraction) take:

* ``''``: the embedded digits;
* ``DIR``: an ImageFolder root (``DIR/<split>/<class>/<image>``), read by :class:`~.folder.SafeImageFolder`;
* ``wds/DIR``: WebDataset ``.tar`` shards in ``DIR`` (samples ``KEY.png|jpg|webp`` + ``KEY.cls``) with timm's
  ``_info.json`` (``{"splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}, ...},
  "num_classes": N}``), or a split given as a brace pattern (``train_split='train-{000..009}.tar'``);
* ``hfds/NAME``: a Hugging Face dataset with ``image`` and ``label`` (ClassLabel) columns: a local dataset directory
  (the Hub layout, e.g. ``data/train-*.parquet``, as ``huggingface-cli download --repo-type dataset`` writes it) or a
  Hub id, read from the datasets cache ``data_root`` (timm's ``--data-dir`` for hfds) when offline.

Unreadable images: folders and hfds decode here, so a bad file is skipped, warned about and counted
(``skipped_images``). WebDataset samples are decoded inside timm's pipeline, whose ``log_and_continue`` handler
drops a bad sample with a logged warning: it is skipped but not counted (in training the stream then reads one more
sample, so the epoch keeps its length; in validation ``num_samples`` is one lower).

WebDataset shards have no random access. Training needs the number of samples (``_info.json`` or
``train_num_samples``): it sets the epoch length (``len(loader)``, the LR schedule) as in timm's ``train.py``.
:class:`ShardStream` makes epoch ``e``'s stream a function of ``(seed, e)`` so that a resumed run (which re-reads
the epoch's first batches and drops them) continues exactly.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from ..cli import UsageError
from .folder import collate_skip_bad, probe_readable, seeded_call

__all__ = ["DATA_HELP", "DataSource", "parse_data", "ReaderImages", "ShardStream", "wds_dataset", "hfds_dataset",
           "make_loader", "collate_stream", "default_val_split"]

DATA_HELP = ("'' (embedded digits), DIR (ImageFolder: DIR/train/<class>/<image>, DIR/val/...), wds/DIR (WebDataset "
             ".tar shards with timm's _info.json) or hfds/NAME (Hugging Face dataset: a local dataset directory or a "
             "Hub id, cached in data_root)")
UNSUPPORTED = ("tfds", "hfids", "torch")


@dataclass(frozen=True)
class DataSource:
    """Where the images are: ``kind`` is digits, folder, wds or hfds."""

    kind: str
    location: str = ""  # folder, shard directory, or HF dataset name / local directory
    root: str = ""  # hfds: the datasets cache directory

    @property
    def timm_name(self) -> str:
        return f"{self.kind}/{self.location}" if self.kind in ("wds", "hfds") else ""

    def describe(self) -> str:
        return "digits" if self.kind == "digits" else (self.timm_name or self.location)


def parse_data(data_dir: str, data_root: str = "", key: str = "data_dir") -> DataSource:
    """Parse a timm-style data name; local paths are checked here, Hub names when they are opened."""
    if not data_dir:
        return DataSource("digits")
    prefix, sep, rest = data_dir.partition("/")
    prefix = prefix.lower() if sep else ""
    if prefix in UNSUPPORTED:
        raise UsageError(f"{key}={data_dir!r}: timm's {prefix}/ readers are not supported here; accepted: {DATA_HELP}")
    if prefix == "wds":
        shards = Path(rest)
        if not shards.is_dir() or not any(shards.glob("*.tar")):
            raise UsageError(f"{key}={data_dir!r}: {rest!r} is not a directory of .tar shards; accepted: wds/DIR "
                             "with WebDataset shards and timm's _info.json")
        return DataSource("wds", rest)
    if prefix == "hfds":
        if not rest:
            raise UsageError(f"{key}={data_dir!r} names no dataset; accepted: hfds/ORG/NAME or hfds/LOCAL_DIR")
        return DataSource("hfds", rest, data_root)
    return DataSource("folder", data_dir)


def default_val_split(source: DataSource) -> str:
    """timm's ``train.py`` default (``validation``) for wds/hfds; ``val`` for ImageFolder roots (ImageNet layout)."""
    return "validation" if source.kind in ("wds", "hfds") else "val"


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets: timm's reader, our decoding (so a bad image is skipped and counted, not replaced)
# ----------------------------------------------------------------------------------------------------------------
class ReaderImages(Dataset):
    """``(image, target)`` from a timm reader (``reader[i] -> (file object, target)``), decoded here.

    timm's ``ImageDataset`` replaces an unreadable image by the next index; here it comes back as ``None`` with a
    warning, so :func:`~.folder.collate_skip_bad` drops and counts it as for folders.
    """

    def __init__(self, reader: Any, transform: Optional[Callable] = None, mode: str = "RGB", name: str = "") -> None:
        self.reader, self.transform, self.mode, self.name = reader, transform, mode, name
        self.classes = [c for c, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])]

    def __len__(self) -> int:
        return len(self.reader)

    def load(self, index: int) -> Tuple[Any, int]:
        """The decoded PIL image and target of sample ``index`` (raises if it cannot be decoded)."""
        from PIL import Image

        f, target = self.reader[index][:2]
        try:
            return Image.open(f).convert(self.mode), int(target)
        finally:
            f.close()

    def check_readable(self, probe: int = 16) -> None:
        probe_readable(self.name, len(self), self.load, probe)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        try:
            image, target = self.load(index)
        except Exception as e:  # PIL raises many types for unreadable images
            warnings.warn(f"skipping unreadable image {index} of {self.name}: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)
            return None
        return (self.transform(image) if self.transform is not None else image), target


def hfds_dataset(source: DataSource, split: str, transform: Optional[Callable] = None,
                 mode: str = "RGB", key: str = "data_dir") -> ReaderImages:
    """Split ``split`` of an hfds source through timm's ``create_dataset``; a dataset that cannot be opened (no
    such split, a Hub id offline) is a :class:`UsageError` naming the local alternatives."""
    from timm.data import create_dataset

    try:
        ds = create_dataset(source.timm_name, root=source.root or None, split=split)
    except ImportError:
        raise UsageError(f"{key}={source.timm_name!r} needs the `datasets` package: pip install datasets") from None
    except Exception as e:  # datasets raises many types: no network, no such split, not a dataset directory
        local = Path(source.location).is_dir()
        where = ("a local dataset directory with image and label columns (e.g. data/<split>-*.parquet)" if local else
                 "offline, a local copy: hfds/DIR after `huggingface-cli download --repo-type dataset "
                 f"{source.location} --local-dir DIR`, or data_root=CACHE_DIR holding an earlier download")
        raise UsageError(f"{key}={source.timm_name!r} split {split!r} could not be opened "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                         f"accepted: {where}") from None
    images = ReaderImages(ds.reader, transform, mode, name=f"{source.timm_name}[{split}]")
    if not images.classes:
        raise UsageError(f"{key}={source.timm_name!r}: the label column is not a ClassLabel, so the classes are "
                         "unknown; accepted: a dataset whose 'label' feature is a datasets.ClassLabel")
    return images


# ----------------------------------------------------------------------------------------------------------------
# WebDataset shards: timm's reader, made reproducible per epoch
# ----------------------------------------------------------------------------------------------------------------
def _wds_info(shards: Path) -> dict:
    for name in ("_info.json", "info.json"):
        if (shards / name).is_file():
            try:
                return json.loads((shards / name).read_text())
            except json.JSONDecodeError as e:
                raise UsageError(f"{str(shards / name)!r} is not valid JSON: {e}") from None
    return {}


def _wds_num_samples(source: DataSource, info: dict, split: str, num_samples: int, key: str) -> int:
    """Samples of ``split``: ``num_samples`` if given, else ``_info.json``'s count, else a ``PATTERN|N`` split."""
    splits = info.get("splits", {})
    is_pattern = ".tar" in split or ".." in split
    if not is_pattern and split not in splits:
        raise UsageError(f"{key}={source.timm_name!r} has no split {split!r} "
                         f"({'_info.json lists ' + ', '.join(map(repr, splits)) if splits else 'no _info.json'}); "
                         "accepted: a split of _info.json or a shard pattern such as 'train-{000000..000009}.tar'")
    if num_samples:
        return num_samples
    if not is_pattern:
        return int(splits[split]["num_samples"])
    return int(split.split("|")[1]) if "|" in split else 0


class ShardStream(IterableDataset):
    """timm's WebDataset stream whose epoch ``e`` is a function of ``(seed, e)`` (and the process/worker layout) only.

    timm shuffles shards with ``seed + epoch`` (``set_epoch``), but seeds its sample-shuffle buffer once per process,
    so in a new process epoch ``e`` would come in another order; and timm's random transforms draw from the global
    RNGs. Here the pipeline is rebuilt at each epoch in the main process (worker processes get a fresh copy of it
    anyway, seeded from :attr:`generator`, which ``set_epoch`` reseeds), and the ``i``-th sample of a worker's stream
    is transformed under a seed of ``(seed, epoch, global worker, i)``.

    Training with several processes (:meth:`configure` with ``world_size > 1``): like timm's ``train.py``, each
    process reads its own shards (timm assigns shard ``k`` to global worker ``k mod (processes x workers)``), so data
    loading scales with the processes instead of funnelling through rank 0; :attr:`reads_own_shards` tells the engine
    to put the loader on the device without re-sharding or dispatching it. Every worker yields exactly timm's
    per-worker count (starting its shards over when they hold fewer), so every process runs the same number of steps.
    """

    def __init__(self, dataset: Any, transform: Optional[Callable], seed: int, name: str) -> None:
        self.dataset, self.transform, self.seed, self.name = dataset, transform, int(seed), name
        self.epoch, self.rank, self.world_size = 0, 0, 1
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def reads_own_shards(self) -> bool:
        return self.world_size > 1

    def configure(self, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1) -> None:
        """Per-device batch, loader workers and, for training, this process's place among ``world_size``."""
        reader = self.dataset.reader
        if reader.is_training:
            shards, readers = len(reader.split_info.filenames), world_size * max(1, num_workers)
            if shards < readers:
                raise UsageError(f"{self.name}: {shards} shard(s) cannot feed {world_size} process(es) x "
                                 f"{max(1, num_workers)} loader worker(s), as each reads its own shards; accepted: at "
                                 f"least {readers} shards, or fewer num_workers")
            if shards % readers:
                warnings.warn(f"{self.name}: {shards} shards over {readers} readers (processes x workers) is uneven: "
                              "each epoch repeats some samples and leaves out others; use a multiple of "
                              f"{readers} shards", RuntimeWarning, stacklevel=2)
            self.rank, self.world_size = int(rank), int(world_size)
            reader.dist_rank, reader.dist_num_replicas = self.rank, self.world_size
        reader.batch_size = batch_size
        self.dataset.set_loader_cfg(num_workers=num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(self.epoch)
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))

    def __len__(self) -> int:
        return len(self.dataset)

    def _samples(self) -> Iterator[Tuple[Any, int]]:
        reader = self.dataset.reader
        if not reader.is_training:
            yield from self.dataset
            return
        # timm's count for this worker (with_epoch stops there, but a worker whose shards hold fewer stops early)
        want, n = reader._num_samples_per_worker(), 0
        while n < want:
            reader.ds = None  # (re)build the pipeline of this epoch: same seed, same order
            start = n
            for item in self.dataset:
                yield item
                n += 1
                if n == want:
                    return
            if n == start:
                raise UsageError(f"{self.name}: loader worker {reader.global_worker_id} of {reader.global_num_workers} "
                                 "found no readable sample in its shards (empty, or every sample undecodable); "
                                 "accepted: shards that each hold readable samples")

    def __iter__(self) -> Iterator[Tuple[Any, int]]:
        info = get_worker_info()
        worker = self.rank * (info.num_workers if info is not None else 1) + (info.id if info is not None else 0)
        if info is None:
            self.dataset.reader.ds = None  # timm builds its pipeline lazily: rebuild it for this epoch
        for i, (image, target) in enumerate(self._samples()):
            if self.transform is not None:
                image = seeded_call(self.transform, image, (self.seed, self.epoch, worker, i))
            yield image, int(target)


def wds_dataset(source: DataSource, split: str, transform: Optional[Callable], *, training: bool, seed: int = 0,
                num_samples: int = 0, mode: str = "RGB", key: str = "data_dir") -> Tuple[ShardStream, int]:
    """``(stream, num_classes)`` of a wds split; training needs its sample count (``_info.json`` or
    ``num_samples``). ``num_classes`` is ``_info.json``'s ``num_classes`` (0 when absent)."""
    from timm.data import create_dataset

    info = _wds_info(Path(source.location))
    count = _wds_num_samples(source, info, split, num_samples, key)
    if training and not count:
        raise UsageError(f"{key}={source.timm_name!r} split {split!r}: the number of training samples is unknown; "
                         "accepted: a split listed with num_samples in the shards' _info.json, or train_num_samples=N "
                         "(it sets the epoch length and the LR schedule, as timm's --train-num-samples)")
    try:
        ds = create_dataset(source.timm_name, root=source.location, split=split, is_training=training,
                            num_samples=count or None, seed=seed, input_img_mode=mode)
    except ImportError:
        raise UsageError(f"{key}={source.timm_name!r} needs the `webdataset` package: pip install webdataset") from None
    return ShardStream(ds, transform, seed, f"{source.timm_name}[{split}]"), int(info.get("num_classes", 0))


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------
def collate_stream(batch: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate stream samples as ``(images, targets, skipped)``; ``skipped`` is per sample (zeros: timm drops bad
    samples before they get here), so that Accelerate's batch dispatch can concatenate and slice it: a validation
    stream is read by rank 0, which sends each rank its slice (exact counts; training streams read their own
    shards)."""
    images, targets = default_collate(batch)
    return images, targets, torch.zeros(len(targets), dtype=torch.long)


def make_loader(dataset: Any, batch_size: int, *, train: bool, num_workers: int = 0,
                collate: Callable = collate_skip_bad, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The train or validation loader of any source: map-style sets are shuffled (training) by Accelerate's seedable
    sampler after ``prepare``; a :class:`ShardStream` shuffles itself and, for training among ``world_size``
    processes, reads process ``rank``'s own shards. Validation batches keep their shape when a file is unreadable
    (``keep_size``), as ``gather_for_metrics`` needs. With CUDA, batches come in pinned memory and the engine's
    accelerator copies them to the device asynchronously."""
    if isinstance(dataset, ShardStream):
        dataset.configure(batch_size, num_workers, rank=rank, world_size=world_size if train else 1)
        return DataLoader(dataset, batch_size=batch_size, drop_last=train, num_workers=num_workers,
                          collate_fn=collate_stream, generator=dataset.generator, pin_memory=torch.cuda.is_available())
    if not train and collate is collate_skip_bad:
        collate = partial(collate_skip_bad, keep_size=True)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and not isinstance(dataset, IterableDataset),
                      drop_last=train, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())

