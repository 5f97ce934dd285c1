"""Data at scale through timm (issue 14 item 4): WebDataset shards (``wds/``) and Hugging Face datasets (``hfds/``)
built here from the digits, read by train_cls.py through timm's create_dataset; exact resume over shards; unreadable
images; offline errors. Nothing downloads (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hcvision import train_cls
from hcvision.cli import UsageError
from hcvision.data.sources import ShardStream, hfds_dataset, make_loader, parse_data, wds_dataset

TINY = ["model=vit_digits_patch2_8_res", "model_kwargs.embed_dim=32", "model_kwargs.depth=2", "progress_bar=false",
        "tensorboard=false", "global_batch_size=32", "diagnostics=false"]
N_TRAIN, N_VAL = 192, 64
CORRUPT = b"\x89PNG\r\n\x1a\n not an image"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def digits_png(split: str, n: int) -> List[Tuple[bytes, int]]:
    """The first ``n`` digits of a split as 8x8 grey PNG bytes with their labels."""
    from sklearn.datasets import load_digits

    from hcvision.data import digits_split_indices

    d = load_digits()
    idx = digits_split_indices()[0 if split == "train" else 1][:n]
    out = []
    for i in idx:
        buf = io.BytesIO()
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), mode="L").save(buf, format="PNG")
        out.append((buf.getvalue(), int(d.target[i])))
    return out


def write_shards(root: Path, samples: dict, per_shard: int = 64, info: bool = True) -> Path:
    """WebDataset layout: ``{split}-{k:06d}.tar`` holding ``KEY.png`` + ``KEY.cls``; timm's ``_info.json``."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in samples.items():
        names, lengths = [], []
        for k, start in enumerate(range(0, len(items), per_shard)):
            name = f"{split}-{k:06d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for j, (png, label) in enumerate(items[start:start + per_shard]):
                    for ext, data in (("png", png), ("cls", str(label).encode())):
                        member = tarfile.TarInfo(f"{split}_{start + j:06d}.{ext}")
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
            names.append(name)
            lengths.append(len(items[start:start + per_shard]))
        splits[split] = {"name": split, "num_samples": len(items), "filenames": names, "shard_lengths": lengths}
    if info:
        (root / "_info.json").write_text(json.dumps({"name": "digits", "num_classes": 10, "splits": splits}))
    return root


def write_hf_dataset(root: Path, samples: dict) -> Path:
    """The Hub's parquet layout (``data/{split}-00000-of-00001.parquet``), with a ClassLabel label column."""
    import datasets

    labels = datasets.ClassLabel(names=[str(i) for i in range(10)])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    for split, items in samples.items():
        ds = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None} for png, _ in items],
                                         "label": [label for _, label in items]}, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("wds") / "digits",
                        {"train": digits_png("train", N_TRAIN), "validation": digits_png("val", N_VAL)})


def _results(d: Path) -> dict:
    return json.loads((d / "results.json").read_text())


@pytest.mark.slow
def test_wds_training_resumes_exactly(tmp_path, shards):
    """Training over tar shards: the epoch length comes from _info.json; a run stopped mid-epoch 2 and resumed (which
    re-reads and drops the epoch's first batches) ends with bit-identical weights."""
    common = TINY + [f"data_dir=wds/{shards}", "epochs=2", "lr=2e-3", "warmup_steps=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_cls.main(common + [f"output_dir={full}"]) == 0
    res = _results(full)
    assert res["global_step"] == 2 * N_TRAIN // 32 and res["num_samples"] == N_VAL and res["data"] == f"wds/{shards}"
    assert train_cls.main(common + [f"output_dir={split}", "max_steps=8"]) == 0  # epoch 2, batch 2 of 6
    assert train_cls.main(common + [f"output_dir={split}", "resume=auto"]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _results(split)["top1"] == res["top1"]


def _labels(stream: ShardStream, epoch: int) -> List[int]:
    stream.set_epoch(epoch)
    return [int(y) for _, y in stream]


def test_shard_stream_is_a_function_of_seed_and_epoch(shards):
    """The same epoch gives the same order again (a resumed process), another epoch another order; every sample of
    the split is in an epoch (no wrap-around at a multiple of the batch), and random transforms are seeded."""
    import torchvision.transforms.v2 as T

    source = parse_data(f"wds/{shards}")
    stream, classes = wds_dataset(source, "train", T.Compose([T.PILToTensor(), T.RandomHorizontalFlip()]),
                                  training=True, seed=5, mode="L")
    stream.configure(batch_size=32, num_workers=0)
    assert classes == 10 and len(stream) == N_TRAIN
    e0, e1, e0_again = _labels(stream, 0), _labels(stream, 1), _labels(stream, 0)
    assert e0 == e0_again and e0 != e1
    assert sorted(e0) == sorted(label for _, label in digits_png("train", N_TRAIN))
    stream.set_epoch(3)
    first = torch.stack([x for x, _ in stream])
    stream.set_epoch(3)
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(first, torch.stack([x for x, _ in stream]))


def test_wds_corrupt_sample_is_dropped_and_sizes_are_required(tmp_path):
    samples = digits_png("val", 10)
    samples[3] = (CORRUPT, samples[3][1])
    root = write_shards(tmp_path / "bad", {"train": samples, "validation": samples})
    source = parse_data(f"wds/{root}")
    val, _ = wds_dataset(source, "validation", None, training=False, mode="L")
    assert len([y for _, y in val]) == 9  # timm's webdataset handler logs and drops the undecodable sample

    bare = write_shards(tmp_path / "bare", {"train": samples}, info=False)
    with pytest.raises(UsageError, match=r"no split 'train' \(no _info.json\)"):
        wds_dataset(parse_data(f"wds/{bare}"), "train", None, training=True)
    with pytest.raises(UsageError, match="train_num_samples=N"):
        wds_dataset(parse_data(f"wds/{bare}"), "train-{000000..000000}.tar", None, training=True)
    stream, classes = wds_dataset(parse_data(f"wds/{bare}"), "train-{000000..000000}.tar", None, training=True,
                                  num_samples=10)
    assert classes == 0 and len(stream) == 10
    out = tmp_path / "run"
    assert train_cls.main(TINY + [f"data_dir=wds/{bare}", f"output_dir={out}"]) == 2
    assert train_cls.main(TINY + [f"data_dir=wds/{tmp_path}/nothing", f"output_dir={out}"]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_hfds_local_copy_trains_and_counts_unreadable_images(tmp_path):
    """A local Hugging Face dataset (parquet, the Hub layout) through timm's hfds reader: one epoch runs, the
    unreadable image is skipped and counted, validation sees every image."""
    train = digits_png("train", 64)
    train[5] = (CORRUPT, train[5][1])
    root = write_hf_dataset(tmp_path / "digits_hf", {"train": train, "validation": digits_png("val", 40)})
    out = tmp_path / "run"
    args = TINY + [f"data_dir=hfds/{root}", f"data_root={tmp_path / 'cache'}", f"output_dir={out}", "epochs=1"]
    with pytest.warns(RuntimeWarning, match="skipping unreadable image 5"):
        assert train_cls.main(args) == 0
    res = _results(out)
    assert res["skipped_train_images"] == 1 and res["num_samples"] == 40 and res["images_seen"] == 63
    assert res["data"] == f"hfds/{root}"

    # the loaded images are the written ones, in order, with their labels
    ds = hfds_dataset(parse_data(f"hfds/{root}", str(tmp_path / "cache")), "validation", mode="L")
    image, label = ds.load(7)
    want_png, want_label = digits_png("val", 40)[7]
    assert label == want_label and np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(want_png))))
    assert ds.classes == [str(i) for i in range(10)]


def test_hfds_offline_hub_id_and_bad_split_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cls.main(TINY + ["data_dir=hfds/some-org/no-such-dataset", f"data_root={tmp_path / 'c'}",
                                  f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "huggingface-cli download --repo-type dataset some-org/no-such-dataset" in err[0]
    root = write_hf_dataset(tmp_path / "hf", {"train": digits_png("train", 8), "validation": digits_png("val", 8)})
    assert train_cls.main(TINY + [f"data_dir=hfds/{root}", "val_split=test", f"data_root={tmp_path / 'c'}",
                                  f"output_dir={out}"]) == 2
    assert "split 'test' could not be opened" in capsys.readouterr().err
    assert train_cls.main(TINY + ["data_dir=tfds/imagenet2012", f"output_dir={out}"]) == 2
    assert not out.exists()


def test_loader_for_map_and_stream_sources(shards):
    stream, _ = wds_dataset(parse_data(f"wds/{shards}"), "train", None, training=True)
    loader = make_loader(stream, 32, train=True)
    assert len(loader) == N_TRAIN // 32 and loader.generator is stream.generator
    assert make_loader(list(range(10)), 4, train=False).drop_last is False


def _rank_samples(root: Path, rank: int, world: int, epoch: int = 0, batch: int = 16) -> List[Tuple[bytes, int]]:
    stream, _ = wds_dataset(parse_data(f"wds/{root}"), "train", None, training=True, seed=3, mode="L")
    stream.configure(batch_size=batch, num_workers=0, rank=rank, world_size=world)
    stream.set_epoch(epoch)
    return [(np.asarray(img).tobytes(), y) for img, y in stream]


def test_each_process_streams_its_own_shards(tmp_path):
    """Training with 2 processes over 4 shards: each reads 2 of them, disjoint, together the whole split once per epoch
    (as timm's train.py splits shards); 3 shards: both still yield 96 samples (one starts its shard over), with a
    warning; fewer shards than readers is an error naming what is accepted."""
    even = write_shards(tmp_path / "even", {"train": digits_png("train", N_TRAIN)}, per_shard=48)
    r0, r1 = _rank_samples(even, 0, 2), _rank_samples(even, 1, 2)
    assert len(r0) == len(r1) == N_TRAIN // 2
    everything = sorted((png, label) for png, label in _rank_samples(even, 0, 1))
    assert sorted(r0 + r1) == everything and not set(r0) & set(r1)
    assert _rank_samples(even, 1, 2) == r1 and _rank_samples(even, 1, 2, epoch=1) != r1  # a function of the epoch
    uneven = write_shards(tmp_path / "uneven", {"train": digits_png("train", N_TRAIN)}, per_shard=64)
    with pytest.warns(RuntimeWarning, match="3 shards over 2 readers"):
        counts = [len(_rank_samples(uneven, r, 2)) for r in (0, 1)]
    assert counts == [N_TRAIN // 2] * 2  # the same number of steps on every process: DDP cannot wait forever
    broken = [(CORRUPT, label) if 48 <= i < 96 else (png, label)
              for i, (png, label) in enumerate(digits_png("train", N_TRAIN))]  # shard 1: nothing decodes
    broken_root = write_shards(tmp_path / "broken", {"train": broken}, per_shard=48)
    counts, errors = [], []
    for rank in range(4):  # timm shuffles the shards before splitting them: one rank gets the broken one
        try:
            counts.append(len(_rank_samples(broken_root, rank, 4)))
        except UsageError as e:  # a clear error instead of looping over an unreadable shard forever
            errors.append(str(e))
    assert counts == [N_TRAIN // 4] * 3 and len(errors) == 1
    assert "of 4 found no readable sample in its shards" in errors[0]
    stream, _ = wds_dataset(parse_data(f"wds/{uneven}"), "train", None, training=True)
    with pytest.raises(UsageError,
                       match=r"3 shard\(s\) cannot feed 2 process\(es\) x 2 loader worker\(s\).*at least 4"):
        stream.configure(batch_size=16, num_workers=2, rank=0, world_size=2)
    with pytest.raises(UsageError, match=r"3 shard\(s\) cannot feed 1 process\(es\) x 4 loader worker\(s\)"):
        make_loader(stream, 16, train=True, num_workers=4)  # one process: a worker without a shard is refused too


@pytest.mark.slow
def test_wds_two_processes_read_their_shards_and_resume_exactly(tmp_path):
    """torchrun with 2 processes over 4 shards: each process streams its own shards (no rank-0 dispatch), every
    process runs the same number of steps, validation (read by rank 0 and dispatched) counts each image once
    (gather_for_metrics drops the padding of the last, uneven batch), and a run stopped after 3 steps and resumed
    ends with the uninterrupted run's weights, bit for bit."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = write_shards(tmp_path / "digits", {"train": digits_png("train", N_TRAIN),
                                              "validation": digits_png("val", N_VAL)}, per_shard=48)
    args = TINY + [f"data_dir=wds/{root}", "epochs=2", "warmup_steps=2", "lr=2e-3", "eval_batch_size=12"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))

    def torchrun(*extra: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(repo / "train_cls.py"), *args, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(f"output_dir={tmp_path / 'full'}")
    torchrun(f"output_dir={tmp_path / 'split'}", "max_steps=3", "checkpoint_every=3")
    torchrun(f"output_dir={tmp_path / 'split'}", "resume=auto")
    full, split = _results(tmp_path / "full"), _results(tmp_path / "split")
    assert full["num_processes"] == 2 and full["per_device_batch"] == 16
    assert (full["global_step"], full["images_seen"], full["num_samples"]) == (2 * N_TRAIN // 32, 2 * N_TRAIN, N_VAL)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert split["top1"] == full["top1"]
