"""``python -m hcvision.compare``: connection kinds x config values x seeds, run and reported with statistics.

    python -m hcvision.compare run --config configs/cls/digits_res.yaml --kinds res,shc2,dhc2 --seeds 0-4 \\
        --out runs/cmp --jobs 2 [--grid lr=1e-3,5e-3] [key=value ...]
    python -m hcvision.compare run ... --emit commands     # OUT/commands.sh, one line per run
    python -m hcvision.compare run ... --emit slurm        # OUT/slurm_array.sbatch (+ slurm_submitit.py)
    python -m hcvision.compare aggregate OUT/runs [MORE_DIRS ...] --out OUT

Every cell is an ordinary ``train_cls.py`` / ``train_dit.py`` run (``OMP_NUM_THREADS=1`` each), so its outputs,
resume and exit codes are the trainers'. Finished cells (``results.json``) are skipped, interrupted ones resume
(``resume=auto``). The report (``summary.md``, ``summary.json``, ``curves_*.png``) has mean, std and count per
variant and metric, and each kind's paired difference against ``res`` on matched seeds with a 95 % t-interval.

Exit codes: 0 done, 1 a run failed (the others still ran), 2 bad input (nothing written), 130 interrupted.
"""
from .report import build_report, collect_runs, describe, holm, paired_difference, write_report
from .spec import Cell, Spec, SpecError, build_spec

__all__ = ["build_spec", "Spec", "Cell", "SpecError", "collect_runs", "build_report", "write_report", "describe",
           "paired_difference", "holm", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
