"""``python -m hcvision.demo``: a Hyper-Connection ViT vs its residual twin on the embedded digits.

Trains ``vit_digits_patch2_8_dhc2`` (DHC, expansion 2) and ``vit_digits_patch2_8_res`` with the
same recipe and budget (the packaged recipes ``digits_dhc2`` / ``digits_res``) through ``hcvision.train_cls``, then
prints the held-out top-1 of both side by side with the paths of their results.  CPU only, offline.

The two runs go in parallel, one process per core with one intra-op thread each: for models this
small that is faster than two threads per run, and it avoids OpenMP spin-waiting when cores are
shared.
"""
from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

RUNS = (("DHC x2", "dhc2"), ("residual", "res"))


def _child_env(**extra: str) -> Dict[str, str]:
    """The environment of a child process: it imports the same hcvision as this one. An installed hcvision is found
    by the child as it was by this process; a checkout run without installing gets its folder on ``PYTHONPATH``."""
    here = str(Path(__file__).resolve().parents[1])
    installed = here in {str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=path if installed else os.pathsep.join(filter(None, [here, path])), **extra)


def _launch(kind: str, out: Path, extra: List[str]) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hcvision.train_cls", "--config", f"digits_{kind}",  # the packaged recipes
           f"output_dir={out / kind}", "progress_bar=false", *extra]
    log = open(out / f"{kind}.log", "w")
    proc = subprocess.Popen(cmd, env=_child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    proc.cmd = cmd  # type: ignore[attr-defined]
    return proc


def _status(run: Path) -> str:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    evals = [json.loads(line) for line in lines if '"val/top1"' in line]
    if not evals:
        return f"{run.name}: starting"
    return f"{run.name}: epoch {evals[-1]['epoch']} top-1 {evals[-1]['val/top1']:.1f}%"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the two runs (default: runs/demo-<time>)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to both runs (e.g. epochs=5)")
    parser.add_argument("--no-analysis", action="store_true", help="skip the connection-matrix / similarity pictures")
    args = parser.parse_args(argv)
    out = Path(args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))

    print("Training on scikit-learn digits (1437 train / 360 held-out images), CPU, same budget for both:")
    t0 = time.perf_counter()
    procs = {kind: _launch(kind, out, args.overrides) for _, kind in RUNS}
    for _, kind in RUNS:
        print(f"  {kind:5s} -> {out / kind}   (log: {out / (kind + '.log')})")
    tty = sys.stdout.isatty()
    last, last_print = "", 0.0
    while any(p.poll() is None for p in procs.values()):
        time.sleep(1.0)
        status = " | ".join(_status(out / kind) for _, kind in RUNS)
        now = time.perf_counter() - t0
        if tty:  # one line, rewritten in place
            print(f"\r  [{now:4.0f}s] {status}" + " " * 8, end="", flush=True)
        elif status != last and now - last_print >= 15:  # logs and CI: a line now and then
            print(f"  [{now:4.0f}s] {status}", flush=True)
            last, last_print = status, now
    if tty:
        print()
    elapsed = time.perf_counter() - t0

    results: Dict[str, dict] = {}
    failed = False
    for label, kind in RUNS:
        p = procs[kind]
        p.log.close()
        if p.returncode != 0:
            failed = True
            tail = (out / f"{kind}.log").read_text().strip().splitlines()[-5:]
            print(f"{label} run failed (exit {p.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
            continue
        results[kind] = json.loads((out / kind / "results.json").read_text())
    if failed:
        return 1

    print(f"\n{'model':34s} {'connection':>10s} {'params':>8s} {'top-1':>7s} {'top-5':>7s} {'img/s':>7s}")
    for label, kind in RUNS:
        r = results[kind]
        print(f"{r['model']:34s} {label:>10s} {r['params']:8d} {r['top1']:6.2f}% {r['top5']:6.2f}% "
              f"{r['images_per_sec']:7.0f}")
    delta = results["dhc2"]["top1"] - results["res"]["top1"]
    epochs = results["res"]["epochs"]
    print(f"\nDHC x2 - residual: {delta:+.2f} top-1 points on 360 held-out digits ({epochs} epochs each, "
          f"{elapsed:.0f} s wall clock for both).")
    print("A single seed on 360 images: differences of a point or two are within run-to-run noise.")
    for _, kind in RUNS:
        print(f"results: {out / kind / 'results.json'}")
    if not args.no_analysis:
        _analyse(out, results)
    return 0


def _analyse(out: Path, results: Dict[str, dict]) -> None:
    """HC paper Sec. 4.5 pictures for both trained models (``python -m hcvision.analysis``)."""
    print("\nAnalysis (unfolded connection matrix, layer similarity, DHC weights):")
    for _, kind in RUNS:
        dest = out / "analysis" / kind
        cmd = [sys.executable, "-m", "hcvision.analysis", "--model", results[kind]["model"],
               "--checkpoint", str(out / kind / "model.safetensors"), "--data", "digits", "--out", str(dest)]
        done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  {kind}: analysis failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        else:
            print(f"  {kind}: {dest}")


if __name__ == "__main__":
    sys.exit(main())
