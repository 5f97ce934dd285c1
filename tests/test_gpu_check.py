"""benchmarks/gpu_check.py end to end in its CPU dry-run mode (tiny shapes, a handful of steps): every section runs,
the JSON is complete, and the fast path agrees with the reference. The GPU figures themselves need a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["dry_run"] and report["backend_checked"] == "torch"
    kinds = {(r["kind"], r["rate"], r["recompute"]) for r in report["correctness"]}
    assert len(kinds) == 5 * 2 * 2 and all(r["max_rel_err"] < 1e-4 for r in report["correctness"])
    assert report["device_figures"]["copy_bandwidth_GBps"] > 0 and report["device_figures"]["matmul_TFLOPs"] > 0
    variants = {(r["workload"], r["variant"]) for r in report["timing"]}
    assert len(variants) >= 2 * 11 and all(r["finite"] and r["step_ms"] > 0 for r in report["timing"])
    assert {r["variant"] for r in report["floor"]} == {f"{k}{n}" for k in ("shc", "dhc", "sfc", "dfc", "mhc")
                                                        for n in (2, 4)}
    assert [r["script"] for r in report["end_to_end"]] == ["train_cls.py", "train_dit.py"]
    assert all(r["ok"] and r["losses"] for r in report["end_to_end"])
    for section in ("Correctness", "Step time", "Bandwidth floor", "End to end"):
        assert f"## {section}" in proc.stdout


def test_gpu_check_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full check would run")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x.json")],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and not (tmp_path / "x.json").exists()
