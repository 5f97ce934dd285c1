"""Faults a shared cluster deals out: a full disk, two processes on one run directory, an output location that cannot be
written, and the one-line messages they end in (:mod:`hcvision.outputs`, :func:`hcvision.cli.out_of_space`).

The lock tests use real second processes (a holder started with ``subprocess`` that reports "locked" and then waits on
its stdin); nothing waits on a sleep. A full disk is injected through ``HCV_FAILPOINT=<point>:<k>:enospc``, which raises
the ``OSError(ENOSPC)`` a full file system raises at that point; ``tests/test_crash_resume.py`` adds a real small tmpfs
where one can be mounted.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hcvision import io, outputs
from hcvision.cli import EXIT_OUT_OF_SPACE, OutOfSpaceError, UsageError, out_of_space
from hcvision.outputs import RunLock, check_writable

REPO = Path(__file__).resolve().parents[1]
HOLDER = r"""
import os, sys
from hcvision.outputs import RunLock
locks = [RunLock(d, "output_dir").acquire() for d in sys.argv[1:]]
worker = os.fork()  # like a DataLoader worker: it must not keep the lock alive after its parent dies
if worker == 0:
    sys.stdin.read()
    os._exit(0)
print("locked", worker, flush=True)
sys.stdin.read()  # hold until the test closes stdin or kills this process
"""


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory path that cannot be created: under /sys for root (who ignores permission bits), else under a
    read-only directory."""
    if os.geteuid() == 0:
        return Path("/sys/hcvision_cannot_write_here/out")
    ro = tmp_path / "read_only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro / "out"


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds RunLocks on the given directories; killed at teardown."""
    procs = []

    def start(*dirs: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, dirs)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        word, worker = proc.stdout.readline().split()
        assert word == "locked"  # the condition: it holds every lock now
        proc.worker = int(worker)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        try:
            os.kill(proc.worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# One writer per run directory
# ---------------------------------------------------------------------------------------------------------------
def test_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_goes_with_it(tmp_path, holder):
    run = tmp_path / "run"
    proc = holder(run)
    with pytest.raises(UsageError) as e:
        RunLock(run, "output_dir").acquire()
    msg = str(e.value)
    assert "in use by another process" in msg and f"PID {proc.pid}" in msg and socket.gethostname() in msg
    assert "started" in msg and "\n" not in msg
    proc.kill()  # a crash: no clean-up code runs, the kernel drops the lock
    proc.wait()
    os.kill(proc.worker, 0)  # its forked worker still runs, and does not hold the lock
    assert (run / outputs.LOCK_NAME).exists()  # the killed holder's file stays, unlocked
    lock = RunLock(run, "output_dir").acquire()
    assert lock.held and f"PID {os.getpid()}" in (run / outputs.LOCK_NAME).read_text()
    lock.release()
    assert not (run / outputs.LOCK_NAME).exists()


def test_lock_in_one_process_conflicts_and_release_leaves_no_trace(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    with RunLock(target) as lock:
        assert lock.held and target.is_dir()
        with pytest.raises(UsageError, match="in use by another process"):
            RunLock(target).acquire()
    assert not (tmp_path / "a").exists()  # the directories it created were empty: removed again


def test_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(outputs, "_warned_no_locking", False)
    first, second = RunLock(tmp_path / "x").acquire(), RunLock(tmp_path / "y").acquire()
    assert not first.held and not second.held
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "cannot lock" in err


def _tiny_dit_weights(path: Path) -> Path:
    import timm

    import hcvision.models  # noqa: F401

    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depth=1, num_heads=2)
    model = timm.create_model("dit_digits_2_shc2", **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"model": "dit_digits_2_shc2", "model_kwargs": json.dumps(kwargs)})
    return path


@pytest.mark.slow  # three entry points as processes of their own, while a fourth process holds their directories
def test_trainer_sampler_and_latent_extraction_exit_2_on_a_held_directory(tmp_path, holder, runner):
    run, samples, latents = tmp_path / "run", tmp_path / "samples", tmp_path / "latents"
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40, np.uint8)).save(tmp_path / "images" / c / "0.png")
    weights = _tiny_dit_weights(tmp_path / "dit.safetensors")
    proc = holder(run, samples, latents)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    commands = [
        (str(REPO / "train_cls.py"), ["model=vit_digits_patch2_8_res", "model_kwargs.embed_dim=32",
                                      "model_kwargs.depth=1", "progress_bar=false", "tensorboard=false",
                                      f"output_dir={run}", "resume=auto"]),
        ("hcvision.sample", ["--checkpoint", str(weights), "--num-samples", "2", "--sampling-steps", "2",
                             "--no-progress", "--out", str(samples)]),
        ("hcvision.data.latents", ["--data-dir", str(tmp_path / "images"), "--out", str(latents), "--vae", "none",
                                   "--image-size", "8", "--num-workers", "0"]),
    ]
    for (target, argv), d in zip(commands, (run, samples, latents)):
        r = runner.run(target, argv, cwd=str(tmp_path), env=env)
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert r.returncode == 2 and "Traceback" not in r.stderr, (target, r.stderr)
        assert len(errors) == 1 and "in use by another process" in errors[0] and f"PID {proc.pid}" in errors[0]
        assert sorted(p.name for p in d.iterdir()) == [outputs.LOCK_NAME], target  # nothing written


# ---------------------------------------------------------------------------------------------------------------
# Output location checked first
# ---------------------------------------------------------------------------------------------------------------
def test_check_writable_probes_and_leaves_nothing(tmp_path):
    (tmp_path / "keep").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert check_writable(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UsageError, match=r"is a regular file, not a directory"):
        check_writable(tmp_path / "keep" / "out", "--out")
    with pytest.raises(UsageError, match=r"is a file, not a directory"):
        check_writable(tmp_path / "keep", "--out")
    with pytest.raises(UsageError, match=r"cannot be written"):
        check_writable(unwritable_dir(tmp_path), "--out")


# ---------------------------------------------------------------------------------------------------------------
# Out of space
# ---------------------------------------------------------------------------------------------------------------
def test_out_of_space_is_recognised_through_every_writer_and_nothing_else(tmp_path, monkeypatch):
    assert out_of_space(OSError(errno.ENOSPC, "x")) == "ENOSPC: No space left on device"
    assert out_of_space(OSError(errno.EDQUOT, "x")).startswith("EDQUOT")
    assert out_of_space(OSError(errno.EACCES, "x")) is None
    safetensors_error = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert out_of_space(safetensors_error).startswith("ENOSPC")
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("wrapped")
    except RuntimeError as chained:
        assert out_of_space(chained).startswith("ENOSPC")
    torch_short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert out_of_space(torch_short_write, tmp_path) is None  # plenty of room: not a full disk

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Full)
    assert "short write" in out_of_space(torch_short_write, tmp_path)


def test_atomic_write_out_of_space_removes_its_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HCV_FAILPOINT", "write.before_rename:1:enospc")
    monkeypatch.setattr(io, "_FAILPOINT_HITS", {})
    with pytest.raises(OutOfSpaceError) as e:
        io.write_json(tmp_path / "results.json", {"a": 1})
    assert str(tmp_path / "results.json") in str(e.value) and "ENOSPC" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_sampler_out_of_space_is_one_line_exit_3_and_a_rerun_completes(tmp_path, monkeypatch, capsys):
    from hcvision.cli import run_cli
    from hcvision.sample import main

    weights = _tiny_dit_weights(tmp_path / "dit.safetensors")
    out = tmp_path / "samples"
    args = ["--checkpoint", str(weights), "--num-samples", "3", "--sampling-steps", "2", "--no-progress",
            "--out", str(out)]
    monkeypatch.setenv("HCV_FAILPOINT", "write.before_rename:2:enospc")  # the second PNG
    monkeypatch.setattr(io, "_FAILPOINT_HITS", {})
    assert run_cli(main, args, "hcvision.sample") == EXIT_OUT_OF_SPACE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of space writing" in err and "000001.png" in err, err
    assert "run the same command again" in err
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["images", "images/000000.png"], left  # no temporary file, no lock file
    monkeypatch.delenv("HCV_FAILPOINT")
    assert run_cli(main, args, "hcvision.sample") == 0
    assert (out / "samples.npz").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Messages that tell the truth
# ---------------------------------------------------------------------------------------------------------------
def test_timm_api_names_a_directory_without_weights_and_reads_one_with_them(tmp_path):
    import timm

    import hcvision.models  # noqa: F401

    name = "vit_digits_patch2_8_res"
    with pytest.raises(FileNotFoundError) as e:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path)))
    msg = str(e.value)
    assert "directory without weights" in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))
    torch.manual_seed(1)
    source = timm.create_model(name)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path)))
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_report_out_of_space_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    from hcvision.cli import run_cli
    from hcvision.compare.cli import PROG, main

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"model": "vit_digits_patch2_8_res", "top1": 90.0}))
    monkeypatch.setenv("HCV_FAILPOINT", "write.before_rename:1:enospc")  # summary.json, the report's first file
    monkeypatch.setattr(io, "_FAILPOINT_HITS", {})
    out = tmp_path / "report"
    assert run_cli(main, ["aggregate", str(tmp_path / "runs"), "--out", str(out), "--no-plots"], PROG) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of space writing" in err and "summary.json" in err, err
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_latent_extraction_out_of_space_is_one_line_exit_3_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    from hcvision.cli import run_cli
    from hcvision.data.latents import main

    for c in ("a", "b"):
        for i in range(2):
            (tmp_path / "images" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    out = tmp_path / "latents"
    args = ["--data-dir", str(tmp_path / "images"), "--out", str(out), "--vae", "none", "--image-size", "8",
            "--shard-size", "2", "--num-workers", "0"]
    monkeypatch.setenv("HCV_FAILPOINT", "write.before_rename:2:enospc")  # the second shard
    monkeypatch.setattr(io, "_FAILPOINT_HITS", {})
    assert run_cli(main, args, "hcvision.data.latents") == EXIT_OUT_OF_SPACE
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # besides the progress bar
    assert len(err) == 1 and "out of space writing" in err[0] and "shards/000000002-000000004" in err[0], err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 1 and not [p for p in files if p.name.startswith(".")], files  # the first shard only
    monkeypatch.delenv("HCV_FAILPOINT")
    assert run_cli(main, args, "hcvision.data.latents") == 0  # resumes: the finished shard is kept
