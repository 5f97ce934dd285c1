"""Command line of :mod:`hcvision.compare` (see the package docstring)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence

from ..cli import run_cli
from .spec import SpecError

PROG = "python -m hcvision.compare"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like the trainers."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {PROG} {self.prog.split()[-1]} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run (or emit) a grid and report it",
                       description="Run every cell of the grid through the normal trainer, then report.")
    r.add_argument("--config", required=True, help="base recipe of the trainer: a YAML file or a packaged recipe name "
                   "(digits_res, dit_digits_shc2, ...)")
    r.add_argument("--kinds", default=None,
                   help="connection kinds replacing the base model's suffix, e.g. res,shc2,dhc2,mhc4")
    r.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="another axis: any config key and its values (repeatable), e.g. lr=1e-3,5e-3")
    r.add_argument("--seeds", default="0", help="seeds, e.g. 0-4 or 0,1,7 (default 0)")
    r.add_argument("--out", required=True, help="directory for runs/ and the report")
    r.add_argument("--jobs", type=int, default=1, help="trainer processes at once on this machine (default 1)")
    r.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per run (default 1)")
    r.add_argument("--trainer", default="auto", help="auto (dit_* models: dit), cls or dit")
    r.add_argument("--emit", choices=("commands", "slurm"), default=None,
                   help="write the grid as shell commands / a Slurm job array instead of running it")
    r.add_argument("--slurm-parallel", type=int, default=0, help="max running array tasks (%%N); 0: no cap")
    r.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, e.g. --slurm-option=--gres=gpu:1 (repeatable)")
    r.add_argument("--slurm-time", default="", help="Slurm --time per task, e.g. 01:00:00")
    r.add_argument("--baseline", default="res", help="kind (or variant label) to pair against (default res)")
    r.add_argument("--title", default="Comparison", help="heading of summary.md")
    r.add_argument("--no-plots", action="store_true", help="skip the learning-curve PNGs")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    a = sub.add_parser("aggregate", help="report finished runs found under directories",
                       description="Collect finished runs (results.json) under the given directories and report.")
    a.add_argument("sources", nargs="+", help="directories searched recursively for finished runs")
    a.add_argument("--out", required=True, help="directory for summary.md, summary.json and curves_*.png")
    a.add_argument("--baseline", default="res", help="kind (or variant label) to pair against (default res)")
    a.add_argument("--title", default="Comparison", help="heading of summary.md")
    a.add_argument("--no-plots", action="store_true", help="skip the learning-curve PNGs")
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _invocation(argv: Sequence[str]) -> str:
    """This invocation as a command line, prefixed with ``cd`` to where it ran."""
    return f"cd {shlex.quote(str(Path.cwd()))} && {PROG} {shlex.join(argv)}"


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .spec import build_spec

    if args.jobs < 1:
        return _fail(f"--jobs {args.jobs} is not valid; accepted: an integer >= 1")
    if args.slurm_parallel < 0:
        return _fail(f"--slurm-parallel {args.slurm_parallel} is not valid; accepted: an integer >= 0")
    try:
        spec = build_spec(args.config, out=args.out, kinds=args.kinds, grid=args.grid, seeds=args.seeds,
                          overrides=args.overrides, trainer=args.trainer, threads=args.threads)
    except SpecError as e:
        return _fail(str(e))
    from ..cli import UsageError
    from ..io import write_json
    from ..outputs import check_writable

    try:
        check_writable(spec.out, "--out")
    except UsageError as e:
        return _fail(str(e))

    command = _invocation(argv)
    record = {"command": command, "cwd": str(Path.cwd()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **spec.to_dict()}
    if args.emit:
        from .emit import emit_commands, emit_slurm

        write_json(spec.out / "compare.json", record)
        paths = [emit_commands(spec)] if args.emit == "commands" else \
            emit_slurm(spec, parallel=args.slurm_parallel, options=args.slurm_option, time_limit=args.slurm_time)
        for p in paths:
            print(f"wrote {p} ({len(spec.cells)} runs)")
        return 0

    from .report import aggregate_command, write_report
    from .runner import run_cells

    write_json(spec.out / "compare.json", record)
    t0 = time.perf_counter()
    outcome = run_cells(spec.cells, jobs=args.jobs, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    runs_dir = spec.out / "runs"
    regenerate = [command, aggregate_command([runs_dir], spec.out, args.baseline, args.title)]
    report = write_report([runs_dir], spec.out, baseline=args.baseline, plots=not args.no_plots,
                          regenerate=regenerate, title=args.title)
    print((spec.out / "summary.md").read_text())
    print(f"{len(outcome.finished)} run(s) now, {len(outcome.skipped)} already finished, {len(outcome.failed)} "
          f"failed; {elapsed:.0f} s wall clock with --jobs {args.jobs}. Report: {spec.out / 'summary.md'}")
    del report
    if outcome.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if outcome.failed:
        for idx, code in outcome.failed.items():
            c = spec.cells[idx]
            print(f"failed: {c.variant} seed {c.seed} (exit {code}), log {c.run_dir / 'train.log'}", file=sys.stderr)
        return 1
    return 0


def _aggregate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ..cli import UsageError
    from ..outputs import check_writable
    from .report import aggregate_command, collect_runs, read_json_object, write_report

    sources = [Path(s) for s in args.sources]
    for s in sources:
        if not s.is_dir():
            return _fail(f"{str(s)!r} is not a directory; accepted: directories holding finished runs "
                         "(results.json)")
    try:
        check_writable(args.out, "--out")
    except UsageError as e:
        return _fail(str(e))
    damaged: list = []
    runs, _ = collect_runs(sources, damaged)
    if not runs:
        why = f"; unreadable: {', '.join(f'{f} ({r})' for f, r in damaged)}" if damaged else ""
        return _fail(f"no finished runs (results.json) under {', '.join(map(str, sources))} could be read{why}")
    regenerate, unreadable = [], []
    for s in sources:  # the grid that made the runs, when the runner recorded it
        for cand in (s / "compare.json", s.parent / "compare.json"):
            if cand.is_file():
                try:
                    cmd = read_json_object(cand).get("command")
                except ValueError as err:  # the report stands without the grid's command
                    print(f"warning: skipped {str(cand)!r}: not readable ({err})", file=sys.stderr)
                    unreadable.append((cand, str(err)))
                    break
                if cmd and cmd not in regenerate:
                    regenerate.append(cmd)
                break
    regenerate.append(aggregate_command(sources, Path(args.out), args.baseline, args.title))
    write_report(sources, Path(args.out), baseline=args.baseline, plots=not args.no_plots, regenerate=regenerate,
                 title=args.title, unreadable=unreadable)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # this process only reads files and plots
    if args.command == "run":
        return _run(args, argv)
    return _aggregate(args, argv)


def cli() -> int:
    """The console script ``hcv-compare``: :func:`main` behind the one error wrapper (one line, exit 2 or 3)."""
    return run_cli(main, prog=PROG)

