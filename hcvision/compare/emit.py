"""The grid for someone else's scheduler: a list of shell commands and a Slurm job array.

Each line is self-contained (skip when ``results.json`` exists, else run with ``resume=auto`` from the repository
root, appending to the run's ``train.log``), so a line can be rerun after preemption and the array can be resubmitted
as a whole. ``python -m hcvision.compare aggregate OUT`` then collects the finished runs.
"""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Dict, List, Sequence

from ._io import write_json_atomic, write_text_atomic
from .spec import Spec

__all__ = ["emit_commands", "emit_slurm", "submitit_available"]


def submitit_available() -> bool:
    return importlib.util.find_spec("submitit") is not None


def _write_cells(spec: Spec) -> None:
    """``cell.json`` in every run directory, so that aggregation labels the runs as the grid does."""
    for c in spec.cells:
        path = c.run_dir / "cell.json"
        if not path.exists():
            write_json_atomic(c.to_dict(), path)


def emit_commands(spec: Spec) -> Path:
    """``OUT/commands.sh``: one line per cell (runnable on its own, or as a whole with ``bash``)."""
    _write_cells(spec)
    head = ["#!/usr/bin/env bash", f"# {len(spec.cells)} runs of the comparison in {spec.out}: one line each, "
            "independent, rerunnable (finished runs are skipped, interrupted ones resume).",
            f"# Then: python -m hcvision.compare aggregate {shlex.quote(str(spec.out / 'runs'))} --out "
            f"{shlex.quote(str(spec.out))}"]
    path = spec.out / "commands.sh"
    write_text_atomic("\n".join(head + [c.shell_line for c in spec.cells]) + "\n", path, mode=0o755)
    return path


def emit_slurm(spec: Spec, *, parallel: int = 0, options: Sequence[str] = (), time_limit: str = "") -> List[Path]:
    """``OUT/slurm_array.sbatch`` (plain ``sbatch``), plus ``OUT/slurm_submitit.py`` when ``submitit`` is importable.

    ``parallel`` caps the running array tasks (``%N``); ``options`` are extra ``#SBATCH`` options such as
    ``--gres=gpu:1`` or ``--partition=cpu``; ``time_limit`` is Slurm's ``--time``.
    """
    _write_cells(spec)
    n = len(spec.cells)
    log_dir = spec.out / "slurm"
    array = f"0-{n - 1}" + (f"%{parallel}" if parallel > 0 else "")
    sb = ["#!/usr/bin/env bash", "#SBATCH --job-name=hcv-compare", f"#SBATCH --array={array}",
          "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={spec.threads}",
          f"#SBATCH --output={log_dir}/%A_%a.out"]
    if time_limit:
        sb.append(f"#SBATCH --time={time_limit}")
    sb += [f"#SBATCH {o if o.startswith('-') else '--' + o}" for o in options]
    sb += ["# One array task per cell of the grid. Check the mapping without running anything:",
           "#   DRY_RUN=1 SLURM_ARRAY_TASK_ID=0 bash slurm_array.sbatch",
           f"# Afterwards: python -m hcvision.compare aggregate {shlex.quote(str(spec.out / 'runs'))} "
           f"--out {shlex.quote(str(spec.out))}",
           "set -euo pipefail", f"mkdir -p {shlex.quote(str(log_dir))}", "CMDS=("]
    sb += [f"  {shlex.quote(c.shell_line)}" for c in spec.cells]
    sb += [")", ': "${SLURM_ARRAY_TASK_ID:?run through sbatch (or set SLURM_ARRAY_TASK_ID)}"',
           'cmd="${CMDS[$SLURM_ARRAY_TASK_ID]}"',
           'if [ "${DRY_RUN:-0}" = 1 ]; then printf "%s\\n" "$cmd"; else eval "$cmd"; fi']
    paths = [spec.out / "slurm_array.sbatch"]
    write_text_atomic("\n".join(sb) + "\n", paths[0], mode=0o755)
    if submitit_available():
        paths.append(_emit_submitit(spec, parallel, options, time_limit))
    return paths


def _emit_submitit(spec: Spec, parallel: int, options: Sequence[str], time_limit: str) -> Path:
    """A Python launcher that submits the same array through submitit (one ``CommandFunction`` per cell)."""
    extra: Dict[str, str] = {}
    for o in options:
        key, _, value = o.lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value
    params = {"name": "hcv-compare", "cpus_per_task": spec.threads, "slurm_additional_parameters": extra}
    if parallel > 0:
        params["slurm_array_parallelism"] = parallel
    if time_limit:
        params["slurm_time"] = time_limit
    text = f'''#!/usr/bin/env python
"""Submit the {len(spec.cells)} runs of {spec.out} as one Slurm job array through submitit."""
import submitit

COMMANDS = {[c.shell_line for c in spec.cells]!r}

executor = submitit.AutoExecutor(folder={str(spec.out / "slurm" / "submitit")!r})
executor.update_parameters(**{params!r})
with executor.batch():
    jobs = [executor.submit(submitit.helpers.CommandFunction(["bash", "-c", c])) for c in COMMANDS]
print("submitted", len(jobs), "tasks:", jobs[0].job_id.split("_")[0] if jobs else "-")
'''
    path = spec.out / "slurm_submitit.py"
    write_text_atomic(text, path, mode=0o755)
    return path
