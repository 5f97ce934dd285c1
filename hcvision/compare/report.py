"""Collect finished runs from any directory tree and report them: table, paired differences, curves, JSON.

A run is a directory with ``results.json`` (and normally ``config.yaml`` and ``metrics.jsonl``) written by
``train_cls.py`` or ``train_dit.py``. Runs made by the comparison runner carry ``cell.json`` (their variant label,
seed and exact command); for other runs the label is derived: the connection kind from the model name (or
``model_kwargs.connection``/``rate``) plus every config key whose value differs between the runs found.

Statistics (per variant and metric): mean, sample standard deviation (ddof 1) and count over seeds. Against the
baseline (the ``res`` variant with the same other grid values), the paired difference on the seeds both have:
mean, a 95 % Student-t interval ``mean +- t_{0.975, n-1} sd / sqrt(n)``, the paired t-test p-value, and Holm's
step-down adjustment of those p-values across the variants (so "significant" survives testing ten kinds at once).
"""
from __future__ import annotations

import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..io import write_json, write_text
from .spec import model_kind_re

__all__ = ["Run", "collect_runs", "describe", "paired_difference", "holm", "build_report", "write_report",
           "METRICS", "read_curves"]

#: metric -> (label, higher is better). The first ones present in every run form the table.
METRICS: Dict[str, Tuple[str, bool]] = {
    "top1": ("top-1 (%)", True),
    "top5": ("top-5 (%)", True),
    "fid": ("FID", False),
    "cls_acc": ("cls_acc (fraction)", True),
    "final_loss": ("last train-batch loss", False),  # the last optimiser step's batch: noisy
}
#: metrics whose paired differences summary.md shows (summary.json has them for every metric)
PAIRED_SHOWN = ("top1", "fid", "cls_acc", "final_loss")
#: validation metrics that metrics.jsonl logs during training (curves)
CURVE_METRICS = ("top1", "fid", "cls_acc")
#: connection diagnostics (hcvision.analysis.diagnostics) drawn when the trainer logged them
CURVE_DIAGNOSTICS = ("conn/res_dist_mean", "conn/beta_std", "conn/composite_gain_fwd", "conn/composite_gain_bwd",
                     "conn/res_ds_err_max", "conn/res_logit_spread_max")
# keys that differ between runs of one comparison without defining a variant
_IGNORED_KEYS = {"seed", "output_dir", "resume", "progress_bar", "tensorboard", "model", "model_kwargs", "num_workers"}


@dataclass
class Run:
    """One finished run."""

    run_dir: Path
    results: Dict[str, Any]
    config: Dict[str, Any]
    cell: Dict[str, Any]
    curves: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    variant: str = ""
    kind: str = ""
    context: str = ""

    @property
    def seed(self) -> int:
        return int(self.cell.get("seed", self.config.get("seed", 0)))

    def value(self, metric: str) -> Optional[float]:
        if metric == "final_loss":
            loss = self.curves.get("train/loss")
            return loss[-1][1] if loss else None
        v = self.results.get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def wall_seconds(self) -> Optional[float]:
        walls = [a.get("wall_seconds") for a in self.cell.get("attempts", [])]
        walls = [w for w in walls if isinstance(w, (int, float))]
        return float(sum(walls)) if walls else None


def read_curves(path: Path) -> Dict[str, List[Tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` from a ``metrics.jsonl``, one value per step (the last one logged: a resumed
    run re-logs the steps between its checkpoint and the interruption)."""
    series: Dict[str, Dict[int, float]] = {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a hard kill
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for k, v in rec.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            k = k[4:] if k.startswith("val/") else k  # the engine groups eval metrics as val/<name>
            series.setdefault(k, {})[step] = float(v)
    return {k: sorted(d.items()) for k, d in series.items()}


def _kind_of(config: Dict[str, Any], results: Dict[str, Any]) -> str:
    kw = config.get("model_kwargs") or {}
    if "connection" in kw:
        from ..connections import kind_record

        conn = str(kw["connection"]).lower()
        conn = "residual" if conn == "res" else conn
        try:
            return kind_record(conn).suffix(kw.get("rate", ""))
        except ValueError:  # a kind this process does not know: label it as written
            return f"{conn}{kw.get('rate', '')}"
    m = model_kind_re().search(str(config.get("model") or results.get("model", "")))
    return m.group(1) if m else ""


def read_json_object(path: Path) -> Dict[str, Any]:
    """A JSON object from ``path``; ``ValueError`` (one line) when the file is unreadable, damaged or no object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    return obj


def _read_yaml_object(path: Path) -> Dict[str, Any]:
    try:
        obj = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a YAML {type(obj).__name__}, not a mapping")
    return obj


def collect_runs(sources: Sequence[Path], damaged: Optional[List[Tuple[Path, str]]] = None
                 ) -> Tuple[List[Run], List[Path]]:
    """Finished runs under ``sources`` (searched recursively) and the run directories that are not finished.

    A run whose results.json, config.yaml or cell.json cannot be read (damaged, truncated, not an object) is left
    out, and ``(file, reason)`` is appended to ``damaged`` when given: one bad run does not take a report down.
    """
    runs: List[Run] = []
    unfinished: List[Path] = []
    seen: set = set()
    for src in sources:
        for marker in sorted(Path(src).rglob("*")):
            if marker.name not in ("results.json", "cell.json", "config.yaml"):
                continue
            d = marker.parent.resolve()
            if d in seen or "checkpoints" in d.parts:
                continue
            seen.add(d)
            if not (d / "results.json").is_file():
                unfinished.append(d)
                continue
            try:
                file = d / "results.json"
                results = read_json_object(file)
                file = d / "config.yaml"
                config = _read_yaml_object(file) if file.is_file() else {}
                file = d / "cell.json"
                cell = read_json_object(file) if file.is_file() else {}
            except ValueError as err:
                if damaged is not None:
                    damaged.append((file, str(err)))
                continue
            runs.append(Run(d, results, config, cell, read_curves(d / "metrics.jsonl")))
    _label(runs)
    return runs, unfinished


def _label(runs: List[Run]) -> None:
    """Variant labels: the runner's own (cell.json) or kind + the config keys that differ between runs."""
    derived = [r for r in runs if not r.cell.get("variant")]
    varying: List[str] = []
    if derived:
        keys = sorted({k for r in derived for k in r.config} - _IGNORED_KEYS)
        varying = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in derived}) > 1]
    for r in runs:
        if r.cell.get("variant"):
            r.variant, r.kind, r.context = r.cell["variant"], r.cell.get("kind", ""), r.cell.get("context", "")
        else:
            r.kind = _kind_of(r.config, r.results)
            r.context = " ".join(f"{k}={r.config.get(k)}" for k in varying)
            r.variant = " ".join(filter(None, [r.kind, r.context])) or str(r.config.get("model", "run"))


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def describe(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample std (ddof 1; NaN for one value) and count."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n}


def paired_difference(a: Dict[int, float], b: Dict[int, float], level: float = 0.95) -> Dict[str, Any]:
    """``a - b`` on the seeds both have: mean, sd, Student-t interval at ``level``, t and two-sided p."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out: Dict[str, Any] = {"seeds": seeds, "n": len(d), "diffs": d,
                           **dict.fromkeys(("mean", "sd", "lo", "hi", "t", "p"), math.nan)}
    if not d:
        return out
    desc = describe(d)
    out.update(mean=desc["mean"], sd=desc["std"])
    if len(d) > 1:
        se = desc["std"] / math.sqrt(len(d))
        half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * se
        out.update(lo=desc["mean"] - half, hi=desc["mean"] + half)
        if se > 0:
            out.update(t=desc["mean"] / se, p=float(2 * stats.t.sf(abs(desc["mean"] / se), len(d) - 1)))
        else:  # identical differences: no spread to test against
            out.update(t=math.copysign(math.inf, desc["mean"]) if desc["mean"] else math.nan,
                       p=0.0 if desc["mean"] else 1.0)
    return out


def holm(pvalues: Dict[str, float]) -> Dict[str, float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count as tests)."""
    valid = sorted(((p, k) for k, p in pvalues.items() if not math.isnan(p)))
    m = len(valid)
    out = dict.fromkeys(pvalues, math.nan)
    running = 0.0
    for i, (p, k) in enumerate(valid):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _order(runs: List[Run]) -> List[str]:
    """Variants in grid order (cell index) when known, the baseline kind first within a context."""
    first: Dict[str, Tuple] = {}
    for r in runs:
        key = (r.cell.get("index", 10 ** 9), r.variant)
        first[r.variant] = min(first.get(r.variant, key), key)
    return sorted(first, key=lambda v: first[v])


def build_report(runs: List[Run], baseline: str = "res", level: float = 0.95) -> Dict[str, Any]:
    """Everything the table, the curves and the JSON show (JSON-ready; NaN where undefined)."""
    variants = _order(runs)
    metrics = [m for m in METRICS if runs and all(r.value(m) is not None for r in runs)]
    by_variant: Dict[str, List[Run]] = {v: sorted([r for r in runs if r.variant == v], key=lambda r: r.seed)
                                        for v in variants}
    table: Dict[str, Any] = {}
    for v, rs in by_variant.items():
        walls = [r.wall_seconds for r in rs if r.wall_seconds is not None]
        table[v] = {
            "kind": rs[0].kind, "context": rs[0].context, "seeds": [r.seed for r in rs],
            "params": rs[0].results.get("params"),
            "wall_seconds": describe(walls) if walls else None,
            "metrics": {m: {**describe([r.value(m) for r in rs]), "values": {r.seed: r.value(m) for r in rs}}
                        for m in metrics},
            "runs": [{"seed": r.seed, "run_dir": str(r.run_dir), "command": r.cell.get("command"),
                      **{m: r.value(m) for m in metrics}} for r in rs],
        }
    paired: Dict[str, Any] = {}
    for m in metrics:
        diffs: Dict[str, Any] = {}
        for v, rs in by_variant.items():
            base = _baseline_of(v, rs[0], by_variant, baseline)
            if base is None:
                continue
            a = {r.seed: r.value(m) for r in rs}
            b = {r.seed: r.value(m) for r in by_variant[base]}
            diffs[v] = {"baseline": base, **paired_difference(a, b, level)}
        adj = holm({v: d["p"] for v, d in diffs.items()})
        for v, d in diffs.items():
            d["p_holm"] = adj[v]
            d["significant"] = bool(not math.isnan(d["lo"]) and (d["lo"] > 0 or d["hi"] < 0))
            d["significant_holm"] = bool(not math.isnan(adj[v]) and adj[v] < 1 - level)
        paired[m] = diffs
    return {"variants": variants, "metrics": metrics, "metric_labels": {m: METRICS[m][0] for m in metrics},
            "higher_is_better": {m: METRICS[m][1] for m in metrics}, "baseline": baseline, "level": level,
            "table": table, "paired": paired, "num_runs": len(runs)}


def _baseline_of(variant: str, run: Run, by_variant: Dict[str, List[Run]], baseline: str) -> Optional[str]:
    """The variant to pair with: ``baseline`` as a variant label, else the ``baseline`` kind in the same context."""
    if variant == baseline:
        return None
    if baseline in by_variant:
        return baseline
    if run.kind == baseline:
        return None
    for v, rs in by_variant.items():
        if rs[0].kind == baseline and rs[0].context == run.context:
            return v
    return None


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _p(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}"


def markdown(report: Dict[str, Any], *, regenerate: Sequence[str] = (), title: str = "Comparison") -> str:
    """The report as markdown: per-variant table, paired differences per metric, regenerating commands."""
    ms = report["metrics"]
    labels = report["metric_labels"]
    digits = {m: 4 if m == "final_loss" else 3 if m == "cls_acc" else 2 for m in ms}  # cls_acc is a fraction
    lines = [f"## {title}", ""]
    head = ["variant", "n"] + [f"{labels[m]} mean ± std" for m in ms] + ["params", "s/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"]:
        row = report["table"][v]
        cells = [f"`{v}`", str(len(row["seeds"]))]
        for m in ms:
            s = row["metrics"][m]
            cells.append(f"{_fmt(s['mean'], digits[m])} ± {_fmt(s['std'], digits[m])}")
        wall = row["wall_seconds"]
        cells += [f"{row['params']:,}" if isinstance(row["params"], int) else "n/a",
                  _fmt(wall["mean"], 0) if wall else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    pct = int(round(100 * report["level"]))
    for m in ms:
        diffs = report["paired"].get(m) or {}
        if not diffs or m not in PAIRED_SHOWN:
            continue
        tested = sum(1 for d in diffs.values() if not math.isnan(d["p"]))
        better = "higher" if report["higher_is_better"][m] else "lower"
        lines += ["", f"Paired difference in {labels[m]} against the baseline on matched seeds ({better} is "
                      f"better): mean, {pct}% t-interval, paired t-test p, Holm-adjusted p over the {tested} "
                      "comparisons with two or more pairs.", ""]
        lines += ["| variant − baseline | pairs | mean diff | " + f"{pct}% CI | p | p (Holm) | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for v, d in diffs.items():
            if d["n"] < 2:
                verdict = "too few pairs"
            elif d["significant_holm"]:
                verdict = "**significant** (after Holm)"
            elif d["significant"]:
                verdict = "CI excludes 0, not after Holm"
            else:
                verdict = "not significant"
            lines.append(f"| `{v}` − `{d['baseline']}` | {d['n']} | {_fmt(d['mean'], digits[m])} | "
                         f"[{_fmt(d['lo'], digits[m])}, {_fmt(d['hi'], digits[m])}] | {_p(d['p'])} | "
                         f"{_p(d['p_holm'])} | {verdict} |")
    if regenerate:
        lines += ["", "Regenerate:", ""] + [f"    {c}" for c in regenerate]
    return "\n".join(lines) + "\n"


def plot_curves(runs: List[Run], report: Dict[str, Any], out: Path) -> List[Path]:
    """One PNG per curve key (train loss; the validation metric when logged): mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["train/loss"] + [k for k in (*CURVE_METRICS, *CURVE_DIAGNOSTICS) if any(k in r.curves for r in runs)]
    written: List[Path] = []
    styles = _styles(report["variants"], {r.variant: r.kind for r in runs}, plt)
    for key in keys:
        fig, ax = plt.subplots(figsize=(8, 5))
        drawn, lo_hi = 0, [math.inf, -math.inf]
        for v in report["variants"]:
            series = [dict(r.curves[key]) for r in runs if r.variant == v and key in r.curves]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            vals = [[s[t] for s in series] for t in steps]
            mean = [sum(x) / len(x) for x in vals]
            color, ls = styles[v]
            ax.plot(steps, mean, color=color, ls=ls, lw=1.4, marker="o" if len(steps) <= 30 else None, ms=3,
                    label=f"{v} (n={len(series)})")
            # min..max over seeds: never below 0, so it stays drawable on the loss's log scale
            ax.fill_between(steps, [min(x) for x in vals], [max(x) for x in vals], color=color, alpha=0.12, lw=0)
            lo_hi = [min(lo_hi[0], min(mean)), max(lo_hi[1], max(mean))]
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        name = METRICS.get(key, (key,))[0] if key != "train/loss" else "train loss (logged batches)"
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(name)
        if key == "train/loss" and lo_hi[0] > 0 and lo_hi[1] / lo_hi[0] > 10:
            ax.set_yscale("log")
        if key == "top1":  # the interesting part is the top; the first epochs would flatten it
            lo = min(min(y for _, y in r.curves[key][len(r.curves[key]) // 3:]) for r in runs if key in r.curves)
            ax.set_ylim(max(0.0, lo - 2.0), 100.5)
        ax.set_title(f"{name}: mean over seeds, band min..max over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = out / f"curves_{re.sub(r'[^A-Za-z0-9]+', '_', key).strip('_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _styles(variants: List[str], kinds: Dict[str, str], plt: Any) -> Dict[str, Tuple[Any, str]]:
    """Colour by connection family (res black), line style by rate (x2 solid, x4 dashed, ...); other grid values
    cycle through tab10."""
    from ..connections import kind_records

    families = [r.tag for r in kind_records() if r.layout != "single"]
    tab = plt.get_cmap("tab10")
    dashes = ["-", "--", ":", "-."]
    rates = sorted({int(m.group(2)) for k in kinds.values() if (m := re.fullmatch(r"([a-z]+)(\d+)", k or ""))})
    out: Dict[str, Tuple[Any, str]] = {}
    contexts: Dict[str, int] = {}
    for v in variants:
        contexts.setdefault(v[len(kinds.get(v, "")):].strip(), len(contexts))
    for i, v in enumerate(variants):
        k = kinds.get(v, "")
        m = re.fullmatch(r"([a-z]+)(\d+)", k or "")
        c_idx = contexts[v[len(k):].strip()]
        if k == "res":
            out[v] = ("black", dashes[c_idx % len(dashes)])
        elif m and m.group(1) in families and len(contexts) == 1:
            out[v] = (tab(families.index(m.group(1))), dashes[rates.index(int(m.group(2))) % len(dashes)])
        else:
            out[v] = (tab(i % 10), dashes[c_idx % len(dashes)])
    return out


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), int dict keys -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(sources: Sequence[Path], out: Path, *, baseline: str = "res", plots: bool = True,
                 regenerate: Sequence[str] = (), title: str = "Comparison",
                 unreadable: Sequence[Tuple[Path, str]] = ()) -> Dict[str, Any]:
    """Collect the runs under ``sources`` and write ``out/{summary.md, summary.json, curves_*.png}``.

    Each damaged run is skipped with a warning on stderr naming the file and counted as missing in summary.md, as
    are the ``unreadable`` files the caller met (e.g. a damaged compare.json).
    """
    from ..provenance import run_provenance

    damaged: List[Tuple[Path, str]] = list(unreadable)
    runs, unfinished = collect_runs(sources, damaged)
    for file, why in damaged[len(unreadable):]:
        print(f"warning: skipped {str(file)!r}: not readable ({why})", file=sys.stderr)
    report = build_report(runs, baseline=baseline)
    report["sources"] = [str(Path(s).resolve()) for s in sources]
    report["unfinished"] = [str(p) for p in unfinished]
    report["unreadable"] = [{"file": str(f), "reason": why} for f, why in damaged]
    report["regenerate"] = list(regenerate)
    report["provenance"] = run_provenance()
    out = Path(out)
    pngs = plot_curves(runs, report, out) if plots and runs else []
    report["curves"] = [p.name for p in pngs]
    text = markdown(report, regenerate=regenerate, title=title)
    if unfinished:
        text += f"\n{len(unfinished)} run(s) not finished (left out): " + ", ".join(map(str, unfinished)) + "\n"
    if damaged:
        text += f"\n{len(damaged)} file(s) unreadable (counted as missing): " + \
            ", ".join(f"{f} ({why})" for f, why in damaged) + "\n"
    report["curves_data"] = {v: {r.seed: {k: r.curves.get(k) for k in ["train/loss", *CURVE_METRICS, *CURVE_DIAGNOSTICS]
                                          if k in r.curves} for r in runs if r.variant == v}
                             for v in report["variants"]}
    write_json(out / "summary.json", _json_safe(report))
    write_text(out / "summary.md", text)
    return report


def aggregate_command(sources: Sequence[Path], out: Path, baseline: str, title: str = "Comparison") -> str:
    """The command line that rebuilds the report from the run directories."""
    args = ["python", "-m", "hcvision.compare", "aggregate", *map(str, sources), "--out", str(out)]
    if baseline != "res":
        args += ["--baseline", baseline]
    if title != "Comparison":
        args += ["--title", title]
    return shlex.join(args)
