"""Crash consistency, tested the way databases test it: kill the trainer with SIGKILL at chosen points (between
optimiser steps, inside a checkpoint write, inside the final atomic writes), resume with ``resume=auto``, and
require that every resume starts from the last complete checkpoint and that the final weights equal those of an
uninterrupted run bit for bit. The kills come from ``HCV_FAILPOINT`` (see :func:`hcvision.io.failpoint`) or from
the test itself at an arbitrary moment.

Each run is a real process of its own, killed with a real SIGKILL, but forked from ``cli_runner``'s forkserver (which
imported torch, timm and accelerate once) rather than started with ``subprocess``: the interpreter start-up was ~70 %
of each of the 16 runs. What is tested (files on disk after a kill, where resume starts, final weights) does not
depend on how the process was started.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_runner import Result, Runner  # `runner`: the session fixture in conftest.py
from safetensors.torch import load_file

from hcvision.io import find_checkpoints

REPO = Path(__file__).resolve().parents[1]
# 1437 training digits at global batch 128: 11 steps per epoch, 22 in all, a checkpoint every 3 steps.
RUN = ["model=vit_digits_patch2_8_dhc2", "model_kwargs.embed_dim=32", "model_kwargs.depth=2", "epochs=2",
       "global_batch_size=128", "warmup_steps=2", "checkpoint_every=3", "keep_checkpoints=2", "ema=true",
       "ema_decay=0.9", "progress_bar=false", "tensorboard=false"]


def _env(failpoint: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("HCV_FAILPOINT", None)
    if failpoint:
        env["HCV_FAILPOINT"] = failpoint
    return env


def _args(out: Path, resume: bool = False) -> list:
    return [*RUN, f"output_dir={out}"] + (["resume=auto"] if resume else [])


def _train(runner: Runner, out: Path, failpoint: str = "", resume: bool = False, timeout: float = 300) -> Result:
    return runner.run(str(REPO / "train_cls.py"), _args(out, resume), cwd=str(REPO), env=_env(failpoint),
                      timeout=timeout)


def _weights(out: Path) -> dict:
    return {name: load_file(str(out / name)) for name in ("model.safetensors", "model_ema.safetensors")}


def _assert_same(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}:{k} differs from the uninterrupted run"


def _resume_point(stdout: str) -> str:
    m = re.search(r"resumed from (\S+) ", stdout)
    return Path(m.group(1)).name if m else ""


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("crash") / "reference"
    r = _train(runner, out)
    assert r.returncode == 0, r.stderr
    return _weights(out)


# Each scenario is a chain of kills; the run is resumed after each one and finally completes. The atomic writes of a
# run from scratch are config.yaml (1), then ema.safetensors and train_state.json per checkpoint (9 checkpoints:
# writes 2-19), then model.safetensors (20), model_ema.safetensors (21) and results.json (22).
SCENARIOS = {
    "between_steps": ["train.step:2", "train.step:5"],
    "inside_checkpoint_writes": ["checkpoint.state_saved:2", "checkpoint.before_rename:1", "checkpoint.renamed:2"],
    "inside_atomic_file_writes": ["write.before_rename:3", "write.before_rename:4"],
    "during_final_outputs": ["write.before_rename:20", "write.before_rename:3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sigkill_then_resume_matches_uninterrupted_run(scenario, runner, reference, tmp_path):
    out, expected, kills = tmp_path / "run", None, 0
    for i, point in enumerate(SCENARIOS[scenario] + [""]):
        r = _train(runner, out, failpoint=point, resume=i > 0)
        if expected and "resumed from" in r.stdout:  # every resume starts from the last complete checkpoint
            assert _resume_point(r.stdout) == expected
        if r.returncode == 0:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        kills += 1
        complete = find_checkpoints(out)
        for p in complete:  # a half-written checkpoint is never listed
            assert (p / "train_state.json").is_file() and (p / "model.safetensors").is_file()
        expected = complete[-1].name if complete else None
    assert r.returncode == 0 and kills == len(SCENARIOS[scenario]), (kills, r.stderr)
    _assert_same(reference, _weights(out))


@pytest.mark.slow
def test_kill_at_an_arbitrary_moment_then_resume(runner, reference, tmp_path):
    """A kill from outside, whenever the first checkpoint exists (between or inside steps and writes)."""
    out = tmp_path / "run"
    child = runner.start(str(REPO / "train_cls.py"), _args(out), cwd=str(REPO), env=_env())
    deadline = time.time() + 900  # only a guard against a hang: the wait ends on the condition
    while not find_checkpoints(out) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.kill()
    killed = child.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # still running when killed, not finished or failed
    r = _train(runner, out, resume=True)
    assert r.returncode == 0, r.stderr
    _assert_same(reference, _weights(out))


# Out of space: the fail point raises the OSError(ENOSPC) a full disk raises there, instead of killing. The run exits 3
# with one line naming the file and the last complete checkpoint, leaves no temporary file, and resume=auto (with room)
# ends with the uninterrupted run's weights. Atomic writes from scratch: config.yaml (1), provenance.json (2),
# ema.safetensors and train_state.json per checkpoint (3-20), model.safetensors (21).
ENOSPC_SCENARIOS = {
    "checkpoint": ("checkpoint.state_saved:3:enospc", ".tmp-step_00000009", "step_00000006"),
    "final_weights": ("write.before_rename:21:enospc", "model.safetensors", "step_00000022"),
}


def _temporary_files(out: Path) -> list:
    return [str(p) for p in out.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(ENOSPC_SCENARIOS))
def test_out_of_space_exits_3_in_one_line_and_resume_matches(scenario, runner, reference, tmp_path):
    point, path, last = ENOSPC_SCENARIOS[scenario]
    out = tmp_path / "run"
    r = _train(runner, out, failpoint=point)
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "out of space writing" in errors[0] and path in errors[0], r.stderr
    assert f"last complete checkpoint: {out / 'checkpoints' / last}" in errors[0] and "resume=auto" in errors[0]
    assert not _temporary_files(out) and not (out / ".lock").exists()
    assert find_checkpoints(out)[-1].name == last
    r = _train(runner, out, resume=True)
    assert r.returncode == 0 and _resume_point(r.stdout) == last, r.stderr
    _assert_same(reference, _weights(out))


def _can_mount_tmpfs(where: Path) -> bool:
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_real_full_tmpfs_then_resume_in_a_copy(reference, tmp_path):
    """A 1200 KiB tmpfs (in a user and mount namespace of its own) holds two ~512 KiB checkpoints but not the third:
    the real ENOSPC (a short write in torch.save or an OS error in safetensors) gives exit 3 and one line, the partial
    checkpoint is removed, and a copy of the run resumed where there is room ends with the uninterrupted weights."""
    import subprocess
    import sys

    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (no unshare or no user namespaces); the injected ENOSPC tests cover it")
    keep = tmp_path / "kept"
    keep.mkdir()
    train = " ".join([sys.executable, str(REPO / "train_cls.py"), *_args(mnt / "run")])
    script = (f"mount -t tmpfs -o size=1200k tmpfs {mnt} && {{ {train} 2> {keep}/stderr; echo $? > {keep}/rc; "
              f"cp -a {mnt}/run {keep}/run; }}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    stderr = (keep / "stderr").read_text()
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert (keep / "rc").read_text().strip() == "3" and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and "out of space writing" in errors[0] and "ENOSPC" in errors[0], stderr
    complete = find_checkpoints(keep / "run")
    assert complete and f"last complete checkpoint: {mnt / 'run' / 'checkpoints' / complete[-1].name}" in errors[0]
    assert not _temporary_files(keep / "run")
    r = subprocess.run([sys.executable, str(REPO / "train_cls.py"), *_args(keep / "run", resume=True)], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and _resume_point(r.stdout) == complete[-1].name, r.stderr
    _assert_same(reference, _weights(keep / "run"))
