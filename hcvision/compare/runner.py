"""Run the cells of a :class:`~hcvision.compare.spec.Spec` on this machine, ``jobs`` trainer processes at a time.

A cell whose ``results.json`` exists is finished and skipped. Any other cell is (re)started with its recorded command,
which carries ``resume=auto``: an interrupted cell continues from its latest checkpoint. A cell that left no
checkpoint starts over, and its stale ``metrics.jsonl`` is removed first so its curves hold one history.

Each run directory gets ``cell.json`` (the cell, its exact command, and per attempt the start time, wall seconds,
exit code and :func:`hcvision.provenance.run_provenance`) and ``train.log`` (the trainer's output).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from tqdm.auto import tqdm

from ..io import write_json
from ..provenance import run_provenance
from .spec import Cell

__all__ = ["RunOutcome", "run_cells", "is_finished", "has_checkpoint"]


@dataclass
class RunOutcome:
    """What :func:`run_cells` did."""

    skipped: List[Cell] = field(default_factory=list)  # already finished
    finished: List[Cell] = field(default_factory=list)  # ran to completion now
    failed: Dict[int, int] = field(default_factory=dict)  # cell index -> exit code
    interrupted: bool = False


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "results.json").is_file()


def has_checkpoint(run_dir: Path) -> bool:
    ckpt = Path(run_dir) / "checkpoints"
    return ckpt.is_dir() and any(p.name.startswith("step_") for p in ckpt.iterdir())


def _read_cell(run_dir: Path) -> dict:
    path = run_dir / "cell.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _start(cell: Cell) -> subprocess.Popen:
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    if not has_checkpoint(cell.run_dir):
        # Nothing to resume from: the trainer starts over and would append to an old history.
        (cell.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    record = _read_cell(cell.run_dir)
    attempts = record.get("attempts", [])
    attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed": has_checkpoint(cell.run_dir),
                     "provenance": run_provenance()})  # per attempt: the code may change between attempts
    write_json(cell.run_dir / "cell.json", {**cell.to_dict(), "attempts": attempts})
    log = open(cell.run_dir / "train.log", "a")
    log.write(f"$ {cell.command}\n")
    log.flush()
    env = dict(os.environ, **cell.env)
    proc = subprocess.Popen(cell.argv, cwd=cell.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # signals reach it once, through on_signal
    proc._hcv_log = log  # type: ignore[attr-defined]
    proc._hcv_t0 = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def _finish(cell: Cell, proc: subprocess.Popen) -> None:
    proc._hcv_log.close()  # type: ignore[attr-defined]
    record = _read_cell(cell.run_dir)
    if record.get("attempts"):
        record["attempts"][-1].update(wall_seconds=round(time.perf_counter() - proc._hcv_t0, 2),  # type: ignore
                                      returncode=proc.returncode)
        write_json(cell.run_dir / "cell.json", record)


def run_cells(cells: List[Cell], jobs: int = 1, progress: bool = True, poll: float = 0.5) -> RunOutcome:
    """Run every unfinished cell, at most ``jobs`` at once; returns what happened.

    SIGINT/SIGTERM are passed on to the running trainers (which save a checkpoint and exit), then the function
    returns with ``interrupted=True``: run the same command again to resume.
    """
    outcome = RunOutcome()
    todo: List[Cell] = []
    for c in cells:
        (outcome.skipped if is_finished(c.run_dir) else todo).append(c)
    bar = tqdm(total=len(cells), initial=len(outcome.skipped), unit="run", desc="compare", dynamic_ncols=True,
               disable=not progress, smoothing=0.0)  # smoothing 0: ETA from the average run time of this session
    running: Dict[int, tuple] = {}
    stop = {"sig": None}

    def on_signal(signum, _frame):  # pass the stop on; the trainers checkpoint and exit
        stop["sig"] = signum
        for _, proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Seed-major order: a study cut short still has every variant on the first seeds.
        queue = sorted(todo, key=lambda c: (c.seed, c.index))
        while queue or running:
            while queue and len(running) < max(1, jobs) and stop["sig"] is None:
                cell = queue.pop(0)
                running[cell.index] = (cell, _start(cell))
            time.sleep(poll)
            for idx, (cell, proc) in list(running.items()):
                if proc.poll() is None:
                    continue
                _finish(cell, proc)
                del running[idx]
                if proc.returncode == 0 and is_finished(cell.run_dir):
                    outcome.finished.append(cell)
                    bar.update(1)
                elif stop["sig"] is None:
                    outcome.failed[cell.index] = proc.returncode
                    bar.update(1)
                    tqdm.write(f"compare: {cell.variant} seed {cell.seed} failed (exit {proc.returncode}); "
                               f"log: {cell.run_dir / 'train.log'}")
            bar.set_postfix_str(", ".join(f"{c.variant}/s{c.seed}" for c, _ in running.values()), refresh=False)
            if stop["sig"] is not None and not running:
                outcome.interrupted = True
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        bar.close()
    return outcome
