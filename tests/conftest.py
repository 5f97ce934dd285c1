"""Shared fixtures, and the per-worker thread setting of a parallel run (``make test`` runs pytest-xdist)."""
from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one xdist worker per core. Each worker (and every process it starts that inherits its
    # environment) then gets one OpenMP thread: two workers with two spinning OpenMP threads each on 2 cores run
    # far slower than one thread each. Set before torch is imported, which is when its pool size is read; an explicit
    # OMP_NUM_THREADS from the caller wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER") and os.environ["OMP_NUM_THREADS"].isdigit():
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))  # in case a plugin imported torch first

# One test process compiles many distinct models whose forwards share code objects (11 ViT kinds in test_vit.py, the
# DiTs, the trainer's compile=true): each is a genuine recompilation, and torch's default limit of 8 per code object
# would make a fullgraph test fail, or a plain compile fall back to eager, depending on which files ran before.
torch._dynamo.config.recompile_limit = 64

# The heaviest test files first, by their measured cost (serial run, 2 cores, 2026-11-28: bad_inputs ~110 s,
# eval_generative ~105 s, kernels_triton ~67 s, fid_extra ~53 s, crash_resume ~50 s after the runner change ...): `make
# test` hands whole files to the workers (`--dist loadfile`, so a module's fixtures are built once), and starting the
# long ones first keeps one worker from finishing minutes before the other. Unlisted files follow in the usual order.
HEAVY_FIRST = ["test_bad_inputs", "test_eval_generative", "test_kernels_triton", "test_fid_extra", "test_crash_resume",
               "test_train_cls", "test_compare", "test_vit", "test_kernels_cpu_loops", "test_readme", "test_latents",
               "test_train_cls_demo", "test_gpu_check", "test_sample", "test_data_sources", "test_train_dit",
               "test_eval_cli", "test_benchmarks", "test_dit"]


def pytest_collection_modifyitems(config, items):
    """In an xdist worker, order the files heaviest first (a stable sort: tests keep their order within a file).
    A plain ``pytest`` run keeps the alphabetical order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


@pytest.fixture
def one_thread():
    """One intra-op thread: the CI box has 2 cores shared by several processes, and OpenMP spinning costs more
    than a second thread gains for these small models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    """Runs an entry point (``train_cls.py``, ``-m hcvision.sample`` ...) as a real process of its own, forked from a
    server that imported torch, timm and accelerate once (see ``cli_runner``): ~1 s instead of ~7 s of CPU a start."""
    from cli_runner import Runner

    repo = Path(__file__).resolve().parents[1]
    return Runner([str(repo), str(repo / "tests")], str(tmp_path_factory.mktemp("runner_logs")))
