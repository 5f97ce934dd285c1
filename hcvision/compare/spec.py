"""The grid of a comparison: a base config, connection kinds, other config axes and seeds, expanded into cells.

Every cell is one ordinary run of ``train_cls.py`` or ``train_dit.py``: the base ``--config`` file, the base
``key=value`` overrides, the cell's own values (``model=`` for the kind, the grid values, ``seed=``) and the runner's
bookkeeping (``output_dir=``, ``resume=auto`` so that rerunning a cell's command continues it).

All input is checked here, by the trainer's own config class, before anything is written (:class:`SpecError`).
"""
from __future__ import annotations

import importlib
import itertools
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..cli import UsageError

__all__ = ["SpecError", "Cell", "Spec", "build_spec", "parse_seeds", "parse_grid_arg", "kind_help", "kind_label_re",
           "model_kind_re"]

TRAINERS = {"cls": "hcvision.train_cls", "dit": "hcvision.train_dit"}  # run as `python -m MODULE`


# The accepted kind labels come from the kind table (hcvision.connections.kinds), read at each call: a kind registered
# later is accepted at once. Labels are timm-name suffixes: a single-stream kind's tag ("res"), else tag + rate.
def _label_pattern(rate: str) -> str:
    from ..connections import kind_records

    records = kind_records()
    alternatives = [re.escape(r.tag) for r in records if r.layout == "single"]
    rated = sorted((r.tag for r in records if r.layout != "single"), key=len, reverse=True)  # longest first
    if rated:
        alternatives.append(f"(?:{'|'.join(map(re.escape, rated))}){rate}")
    return "|".join(alternatives)


def kind_label_re() -> "re.Pattern[str]":
    """``--kinds`` labels: ``res``, ``dhc2``, ``mhclite4`` ... (rate >= 1)."""
    return re.compile(r"^(%s)$" % _label_pattern("[1-9][0-9]*"))


def model_kind_re() -> "re.Pattern[str]":
    """The connection suffix of a registered model name (``vit_..._dhc2`` -> ``dhc2``)."""
    return re.compile(r"_(%s)$" % _label_pattern("[0-9]+"))


def kind_help() -> str:
    """E.g. ``res, or shc<n>, dhc<n>, ... with n >= 1 (e.g. res,dhc2,mhc4)``, from the kind table."""
    from ..connections import kind_records

    records = kind_records()
    single = [r.tag for r in records if r.layout == "single"]
    rated = [f"{r.tag}<n>" for r in records if r.layout != "single"]
    return f"{', '.join(single)}, or {', '.join(rated)} with n >= 1 (e.g. res,dhc2,mhc4)"


# The runner sets these per cell; a user value would silently be overridden, so it is refused instead.
RESERVED = ("seed", "output_dir", "resume")


class SpecError(UsageError):
    """Bad comparison input; the message is one line naming the bad value and what is accepted."""


@dataclass
class Cell:
    """One run of the grid."""

    index: int
    variant: str  # e.g. "dhc2" or "dhc2 lr=0.001": the cell without its seed
    kind: str  # connection kind label ("" when the grid has no kinds axis)
    context: str  # the non-kind grid values ("lr=0.001"), used to match a variant with its baseline
    seed: int
    run_dir: Path
    argv: List[str]  # the trainer command
    env: Dict[str, str]  # environment variables the command sets
    cwd: Path  # where the command runs (the comparison's working directory: relative paths keep their meaning)

    @property
    def command(self) -> str:
        """The exact shell command (run from :attr:`cwd`)."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv)])

    @property
    def shell_line(self) -> str:
        """Self-contained line: skip if finished, else run (resuming) from :attr:`cwd`, log to train.log."""
        d = shlex.quote(str(self.run_dir))
        return (f"[ -f {d}/results.json ] || {{ mkdir -p {d} && cd {shlex.quote(str(self.cwd))} && "
                f"{self.command} >> {d}/train.log 2>&1; }}")

    def to_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "variant": self.variant, "kind": self.kind, "context": self.context,
                "seed": self.seed, "run_dir": str(self.run_dir), "argv": self.argv, "env": self.env,
                "command": self.command, "cwd": str(self.cwd)}


@dataclass
class Spec:
    """A validated comparison grid."""

    config: Path
    trainer: str  # "cls" or "dit"
    module: str  # the trainer, run as `python -m module`
    kinds: List[str]
    grid: List[Tuple[str, List[str]]]
    seeds: List[int]
    overrides: List[str]
    out: Path
    threads: int
    cells: List[Cell] = field(default_factory=list)
    base_model: str = ""

    @property
    def baseline_kind(self) -> Optional[str]:
        return "res" if "res" in self.kinds else None

    def to_dict(self) -> Dict[str, Any]:
        return {"config": str(self.config), "trainer": self.trainer, "module": self.module, "kinds": self.kinds,
                "grid": [[k, v] for k, v in self.grid], "seeds": self.seeds, "overrides": self.overrides,
                "out": str(self.out), "threads": self.threads, "base_model": self.base_model,
                "cells": [c.to_dict() for c in self.cells]}


# ------------------------------------------------------------------------------------------------
# Parsing helpers
# ------------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"``, ``"0-4"`` or a mix (``"0-2,7"``) -> sorted unique seeds."""
    seeds: List[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise SpecError(f"--seeds {text!r}: {part!r} is not a seed; accepted: non-negative integers and "
                            "ranges, comma-separated (e.g. 0-4 or 0,1,7)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise SpecError(f"--seeds {text!r} names no seed; accepted: e.g. 0-4 or 0,1,7")
    return sorted(set(seeds))


def _split_values(raw: str) -> List[str]:
    """Split on commas outside brackets, so ``betas=[0.9,0.99],[0.9,0.95]`` keeps its lists."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v != ""]


def parse_grid_arg(arg: str) -> Tuple[str, List[str]]:
    """``"lr=1e-3,5e-3"`` -> ``("lr", ["1e-3", "5e-3"])``."""
    if "=" not in arg:
        raise SpecError(f"--grid {arg!r} is not of the form key=v1,v2,...; e.g. --grid lr=1e-3,5e-3")
    key, raw = arg.split("=", 1)
    key = key.strip()
    values = _split_values(raw)
    if not key or not values:
        raise SpecError(f"--grid {arg!r} has an empty key or no values; e.g. --grid lr=1e-3,5e-3")
    if len(set(values)) != len(values):
        raise SpecError(f"--grid {arg!r} repeats a value; give each value once")
    return key, values


def parse_kinds(text: str) -> List[str]:
    kinds = [k.strip().lower() for k in str(text).split(",") if k.strip()]
    if not kinds:
        raise SpecError(f"--kinds {text!r} names no kind; accepted: {kind_help()}")
    label = kind_label_re()
    for k in kinds:
        if not label.match(k):
            raise SpecError(f"unknown connection kind {k!r} in --kinds; accepted: {kind_help()}")
    if len(set(kinds)) != len(kinds):
        raise SpecError(f"--kinds {text!r} repeats a kind; give each kind once")
    return kinds


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "base"


# ------------------------------------------------------------------------------------------------
# Trainer config class (the trainer's own validation)
# ------------------------------------------------------------------------------------------------
def _trainer_config_class(module: str) -> type:
    """The trainer's config class (``CONFIG`` of its module)."""
    return importlib.import_module(module).CONFIG


def _check_argv(cls: type, argv: Sequence[str], where: str) -> Any:
    from hcvision.engine import ConfigError, parse_config

    try:
        return parse_config(cls, list(argv))
    except ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Building the grid
# ------------------------------------------------------------------------------------------------
def build_spec(
    config: str,
    *,
    out: str,
    kinds: Optional[str] = None,
    grid: Sequence[str] = (),
    seeds: str = "0",
    overrides: Sequence[str] = (),
    trainer: str = "auto",
    threads: int = 1,
    python: str = sys.executable,
) -> Spec:
    """Parse and validate everything; raises :class:`SpecError` before anything is written."""
    from hcvision.engine import ConfigError, check_model_name, load_yaml
    from hcvision.resources import resolve_recipe

    try:
        cfg_path = resolve_recipe(config).resolve()  # a YAML file or a packaged recipe name (digits_res)
    except UsageError as e:
        raise SpecError(str(e)) from None
    if not out:
        raise SpecError("--out is empty; accepted: a directory for the runs and the report")
    if isinstance(threads, bool) or int(threads) < 1:
        raise SpecError(f"--threads {threads!r} is not valid; accepted: an integer >= 1")
    try:
        base = load_yaml(cfg_path)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise SpecError(f"override {o!r} is not of the form key=value")
        if o.split("=", 1)[0].strip() in RESERVED:
            raise SpecError(f"override {o!r}: {', '.join(RESERVED)} are set per cell by the runner; use --seeds "
                            "for seeds and --out for the output directory")
    model = str(base.get("model", ""))
    for o in overrides:
        k, v = o.split("=", 1)
        if k.strip() == "model":
            model = v.strip()
    if trainer == "auto":
        trainer = "dit" if model.startswith("dit_") else "cls"
    if trainer not in TRAINERS:
        raise SpecError(f"--trainer {trainer!r} is not valid; accepted: auto, cls, dit")
    module = TRAINERS[trainer]

    kind_list = parse_kinds(kinds) if kinds else []
    axes = [parse_grid_arg(g) for g in grid]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise SpecError(f"--grid names a key twice ({keys}); give each key once with all its values")
    for k in keys:
        if k in RESERVED:
            raise SpecError(f"--grid {k}=...: {', '.join(RESERVED)} are set per cell by the runner; use --seeds "
                            "for seeds")
        if k == "model" and kind_list:
            raise SpecError("--grid model=... and --kinds both choose the model; use one of them")
    seed_list = parse_seeds(seeds)

    base_prefix = ""
    if kind_list:
        m = model_kind_re().search(model)
        if not m:
            raise SpecError(f"--kinds needs a base model whose name ends in a connection suffix; model={model!r} "
                            f"has none (accepted suffixes: {kind_help()})")
        base_prefix = model[: m.start()]

    cls = _trainer_config_class(module)
    out_dir = Path(out).resolve()
    env = {"OMP_NUM_THREADS": str(int(threads)), "MKL_NUM_THREADS": str(int(threads))}
    spec = Spec(config=cfg_path, trainer=trainer, module=module, kinds=kind_list, grid=axes, seeds=seed_list,
                overrides=overrides, out=out_dir, threads=int(threads), base_model=model)
    checked_models: set = set()
    for kind in (kind_list or [""]):
        for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in axes]):
            context = " ".join(f"{k}={v}" for k, v in combo)
            variant = " ".join(filter(None, [kind, context])) or "base"
            cell_over = [f"{k}={v}" for k, v in combo]
            if kind:
                cell_over.insert(0, f"model={base_prefix}_{kind}")
            for seed in seed_list:
                run_dir = out_dir / "runs" / _slug(variant.replace(" ", "__")) / f"seed{seed}"
                args = ["--config", str(cfg_path), *overrides, *cell_over, f"seed={seed}",
                        f"output_dir={run_dir}", "resume=auto", "progress_bar=false"]
                cfg = _check_argv(cls, args, f"cell {variant!r} seed {seed}")
                if cfg.model not in checked_models:
                    try:
                        check_model_name(cfg.model)
                    except ConfigError as e:
                        raise SpecError(f"cell {variant!r}: {e}") from None
                    checked_models.add(cfg.model)
                spec.cells.append(Cell(index=len(spec.cells), variant=variant, kind=kind, context=context, seed=seed,
                                       run_dir=run_dir, argv=[python, "-m", module, *args], env=env,
                                       cwd=Path.cwd()))
    if not spec.cells:
        raise SpecError("the grid is empty; give --kinds, --grid key=v1,v2 and/or --seeds")
    return spec
