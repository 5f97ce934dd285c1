"""End-to-end tests of train_cls.py: outputs, exact resume, faults, bad input, ImageFolder, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hcvision import train_cls

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# A tiny DHC digits ViT: fast enough for many runs, still exercising the dynamic connections.
TINY = ["model=vit_digits_patch2_8_dhc2", "model_kwargs.embed_dim=32", "model_kwargs.depth=2",
        "progress_bar=false", "tensorboard=false"]



pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _results(d: Path) -> dict:
    return json.loads((d / "results.json").read_text())


def test_outputs_results_and_timm_loadable_weights(tmp_path, capsys):
    import timm

    import hcvision  # noqa: F401

    out = tmp_path / "run"
    rc = train_cls.main(TINY + [f"output_dir={out}", "epochs=2", "lr=5e-3", "ema=true", "ema_decay=0.9",
                                "checkpoint_every=20", "keep_checkpoints=2"])
    assert rc == 0
    res = _results(out)
    for key in ("top1", "top5", "epochs", "images_per_sec", "model", "params", "num_samples"):
        assert key in res, key
    assert res["epochs"] == 2 and res["model"] == "vit_digits_patch2_8_dhc2"
    assert res["num_samples"] == 360  # the fixed 20 % held-out split
    assert res["images_per_sec"] > 0
    assert res["top1"] > 30.0  # 2 epochs of a tiny model: well above the 10 % of chance
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "model_ema.safetensors").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(ckpts) == 2 and all(c.startswith("step_") for c in ckpts)  # keep_checkpoints prunes older ones
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in line for line in lines) and any("val/ema_top1" in line for line in lines)
    assert lines[0]["world_size"] == 1 and lines[0]["per_device_batch"] == res["per_device_batch"]
    # Connection diagnostics every log_every steps: the static matrices moved away from their Pre-Norm init.
    diag = [line for line in lines if "conn/width_dist_mean" in line]
    assert diag and diag[-1]["conn/width_dist_mean"] > 0 and "conn/composite_gain_fwd" in diag[-1]
    prov = res["provenance"]
    assert prov["seed"] == 0 and torch.__version__.startswith(prov["packages"]["torch"])
    assert json.loads((out / "provenance.json").read_text())["command"] == prov["command"]

    # The exported weights load through timm's pretrained path and reproduce the reported top-1.
    kwargs = res["model_kwargs"]
    model = timm.create_model(res["model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **kwargs).eval()
    from hcvision.data import DigitsDataset

    ds = DigitsDataset("val", model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    with torch.no_grad():
        logits = model(ds.images)
    correct = int((logits.argmax(1) == ds.targets).sum())
    assert correct == round(res["top1"] * 360 / 100)

    # eval_only on the run directory reports the same numbers.
    capsys.readouterr()
    rc = train_cls.main(TINY + ["eval_only=true", f"checkpoint={out}"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["top5"] == pytest.approx(res["top5"])
    assert ev["num_samples"] == 360


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    # Accumulation 2 over 89 batches/epoch leaves a short last window; mixup, dropout, drop-path and
    # EMA all consume randomness, so any RNG or schedule drift on resume changes the weights.
    common = TINY + ["epochs=2", "global_batch_size=32", "grad_accum_steps=2", "mixup=0.2", "smoothing=0.1",
                     "model_kwargs.proj_drop_rate=0.1", "model_kwargs.drop_path_rate=0.1", "ema=true",
                     "ema_decay=0.99", "warmup_steps=10", "digits_augment=true"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert train_cls.main(common + [f"output_dir={full}"]) == 0
    assert train_cls.main(common + [f"output_dir={split}", "max_steps=57"]) == 0  # mid epoch 2 (45 updates/epoch)
    state = json.loads(next((split / "checkpoints").glob("step_00000057/train_state.json")).read_text())
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < 89
    assert train_cls.main(common + [f"output_dir={split}", "resume=auto"]) == 0
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _tensors(full / name), _tensors(split / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    assert _results(full)["top1"] == _results(split)["top1"]
    # And the interruption really changed something mid-way: the checkpoint differs from the end.
    mid = _tensors(split / "checkpoints" / "step_00000057" / "model.safetensors")
    assert any(not torch.equal(mid[k], a[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = train_cls.main(TINY + [f"output_dir={out}", "lr=1e30", "warmup_steps=0", "clip_grad=0",
                                "checkpoint_every=1", "keep_checkpoints=5", "epochs=1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "non-finite loss" in err and "Last good checkpoint" in err
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts, "the checkpoints written before the divergence must be kept"
    assert str(ckpts[-1]) in err
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    # The kept checkpoint is complete and loadable.
    state = json.loads((ckpts[-1] / "train_state.json").read_text())
    assert state["global_step"] == int(ckpts[-1].name.split("_")[1])
    assert _tensors(ckpts[-1] / "model.safetensors")


def _assert_bad(argv, match, capsys, must_not_exist=()):
    rc = train_cls.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    for p in must_not_exist:
        assert not Path(p).exists(), f"{p} was written"


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_bad(TINY + [f"output_dir={out}", f"data_dir={tmp_path / 'nope'}"], "does not exist", capsys, [out])
    _assert_bad(TINY + [f"output_dir={out}", "model=vit_digits_patch2_8_dhc"], "vit_digits_patch2_8_dhc2",
                capsys, [out])
    _assert_bad(TINY + [f"output_dir={out}", "epoch=3"], "did you mean 'epochs'", capsys, [out])
    _assert_bad(TINY + [f"output_dir={out}", "lr=-1"], "lr=-1", capsys, [out])
    _assert_bad(TINY + [f"output_dir={out}", "mixed_precision=fp8"], "'no', 'bf16', 'fp16'", capsys, [out])
    _assert_bad(TINY + [f"output_dir={out}", "epochs=many"], "expected int", capsys, [out])
    _assert_bad(TINY + [f"output_dir={out}", "global_batch_size=33", "grad_accum_steps=2"], "divisible",
                capsys, [out])
    # An output_dir that holds another run, without resume.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("model: x\n")
    _assert_bad(TINY + [f"output_dir={other}"], "already holds a run", capsys)
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml"]
    # A checkpoint whose classifier has another number of classes.
    ck = tmp_path / "seven.safetensors"
    save_file({"head.weight": torch.zeros(7, 32), "head.bias": torch.zeros(7)}, str(ck))
    _assert_bad(TINY + ["eval_only=true", f"checkpoint={ck}"], "has 7 classes but the data has 10", capsys)


def _write_image_folder(root: Path, n_per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n_per_class):
                arr = (rng.random((8, 8)) * 60 + 60 * c).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(d / f"img{i}.png")
        (root / split / "class1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def test_image_folder_training_skips_and_counts_corrupt_files(tmp_path, capsys):
    data = tmp_path / "data"
    _write_image_folder(data)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"corrupt\.png"):
        rc = train_cls.main(TINY + [f"output_dir={out}", f"data_dir={data}", "epochs=1", "global_batch_size=13",
                                    "model_kwargs.num_classes=3"])
    assert rc == 0
    res = _results(out)
    assert res["data"] == str(data)
    assert res["skipped_images"] == 1  # val: one corrupt file of 13
    assert res["skipped_train_images"] == 1  # train: one batch of 13 holding the corrupt file
    assert res["num_samples"] == 12
    assert res["model_kwargs"]["num_classes"] == 3
    # eval_only on the val folder reproduces the numbers; a 10-class checkpoint is refused.
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=r"corrupt\.png"):
        assert train_cls.main(TINY + [f"data_dir={data}", "eval_only=true", f"checkpoint={out}"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (ev["top1"], ev["num_samples"], ev["skipped_images"]) == (res["top1"], 12, 1)
    ten = tmp_path / "ten.safetensors"
    save_file({"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}, str(ten))
    _assert_bad(TINY + [f"data_dir={data}", "eval_only=true", f"checkpoint={ten}"],
                "has 10 classes but the data has 3", capsys)


def test_bf16_mixed_precision_runs(tmp_path):
    out = tmp_path / "bf16"
    assert train_cls.main(TINY + [f"output_dir={out}", "mixed_precision=bf16", "max_steps=3"]) == 0
    res = _results(out)
    assert res["mixed_precision"] == "bf16" and res["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in _tensors(out / "model.safetensors").values())


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path, runner):
    # A real process and a real SIGTERM; forked from the conftest runner's server rather than a fresh interpreter,
    # which only saves the imports (the handler under test is installed by the trainer itself).
    out = tmp_path / "sig"
    child = runner.start(str(REPO / "train_cls.py"), [*TINY, f"output_dir={out}", "epochs=200", "log_every=1"],
                         cwd=str(tmp_path), env=_env())
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 900  # only a guard against a hang: the wait ends on the condition
        while time.monotonic() < deadline:  # the first logged step (startup time varies with machine load)
            if metrics.exists() and metrics.read_text().strip():
                break
            if child.poll() is not None:
                break
            time.sleep(0.2)
        assert child.poll() is None, child.wait().stderr
        child.send_signal(signal.SIGTERM)
        r = child.wait(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "Traceback" not in r.stderr
    assert "stopped by signal" in r.stderr and "resume=auto" in r.stderr
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["global_step"] >= 1
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_two_process_ddp_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    # eval_batch_size 16 on 2 ranks: 360 val images are 11.25 global batches, so the last one is
    # padded by the sampler and gather_for_metrics must drop the duplicates.
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "train_cls.py"),
           *TINY, f"output_dir={out}", "epochs=1", "eval_batch_size=16", "global_batch_size=32"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(out)
    assert res["num_processes"] == 2 and res["num_samples"] == 360
    assert res["global_step"] == 1437 // 32  # global batch constant: 16 per rank
    # A single-process evaluation of the saved weights gives the same top-1/top-5.
    rc = subprocess.run([PY, str(REPO / "train_cls.py"), *TINY, "eval_only=true", f"checkpoint={out}"],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    ev = json.loads(rc.stdout.strip().splitlines()[-1])
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["top5"] == pytest.approx(res["top5"])
