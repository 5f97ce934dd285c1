"""hcvision.compare: grid runner, skip/resume, statistics, aggregation, emitted commands, bad input."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from hcvision.compare import build_spec, describe, holm, paired_difference
from hcvision.compare.cli import main
from hcvision.compare.report import build_report, collect_runs, read_curves

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cls" / "digits_res.yaml")
# One short epoch: 6 optimiser steps, so a run takes seconds; the eval at the end still gives top-1.
FAST = ["epochs=1", "max_steps=6", "log_every=2", "tensorboard=false"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcvision.compare", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# Statistics against independent computations
# ---------------------------------------------------------------------------------------------------------------
def test_paired_difference_matches_scipy_and_hand_formula():
    a = {0: 97.5, 1: 96.9, 2: 98.1, 3: 97.2, 4: 96.4, 9: 50.0}  # seed 9 has no partner: must be ignored
    b = {0: 96.8, 1: 97.0, 2: 97.1, 3: 96.1, 4: 96.0, 7: 10.0}
    d = paired_difference(a, b)
    seeds = [0, 1, 2, 3, 4]
    xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
    ref = stats.ttest_rel(xa, xb)
    diffs = [x - y for x, y in zip(xa, xb)]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    assert d["seeds"] == seeds and d["n"] == 5
    assert d["mean"] == pytest.approx(mean, abs=1e-12)
    assert d["sd"] == pytest.approx(sd, abs=1e-12)
    assert (d["lo"], d["hi"]) == (pytest.approx(mean - half, abs=1e-12), pytest.approx(mean + half, abs=1e-12))
    assert d["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    # scipy's own confidence interval of the paired test agrees
    ci = ref.confidence_interval(0.95)
    assert (d["lo"], d["hi"]) == (pytest.approx(ci.low, abs=1e-10), pytest.approx(ci.high, abs=1e-10))


def test_paired_difference_edge_cases():
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["lo"]) and math.isnan(one["p"])
    assert paired_difference({0: 1.0}, {1: 1.0})["n"] == 0
    const = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # identical differences: zero spread
    assert const["lo"] == const["hi"] == 1.0 and const["p"] == 0.0


def test_describe_and_holm_against_hand_values():
    xs = [1.0, 2.0, 4.0, 7.0]
    d = describe(xs)
    assert d["n"] == 4 and d["mean"] == 3.5 and d["std"] == pytest.approx(statistics.stdev(xs))
    assert math.isnan(describe([3.0])["std"])
    # Holm by hand: sorted p 0.01, 0.02, 0.04 with m = 3 -> 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    adj = holm({"a": 0.04, "b": 0.01, "c": 0.02, "d": float("nan")})
    assert adj["b"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.04) and adj["a"] == pytest.approx(0.04)
    assert math.isnan(adj["d"])
    assert holm({"a": 0.6, "b": 0.5})["a"] == 1.0  # capped at 1


def test_read_curves_keeps_last_value_per_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 2, "train/loss": 3.0}\n{"step": 4, "train/loss": 2.0}\n'
                 '{"step": 4, "train/loss": 1.5, "top1": 50.0}\n{"step": 5, "val/top1": 60.0, "epoch": 1}\n'
                 '{"step": 6, "train/lo')  # resumed, then cut
    c = read_curves(p)
    assert c["train/loss"] == [(2, 3.0), (4, 1.5)] and c["top1"] == [(4, 50.0), (5, 60.0)] and "epoch" not in c


# ---------------------------------------------------------------------------------------------------------------
# The runner end to end: 2 kinds x 2 seeds, skip finished, resume interrupted, aggregate from a directory
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_grid_2x2_runs_skips_resumes_and_aggregates(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["run", "--config", CONFIG, "--kinds", "res,dhc2", "--seeds", "0,1", "--out", str(out), "--jobs", "2",
            "--no-progress", *FAST]
    done = _compare(*args)  # once through `python -m`, then in-process (saves the imports)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dirs = {(k, s): out / "runs" / k / f"seed{s}" for k in ("res", "dhc2") for s in (0, 1)}
    results = {key: json.loads((d / "results.json").read_text()) for key, d in run_dirs.items()}
    assert {r["model"] for r in results.values()} == {"vit_digits_patch2_8_res", "vit_digits_patch2_8_dhc2"}
    assert all(r["global_step"] == 6 for r in results.values())
    for (k, s), d in run_dirs.items():  # each run records its exact command, which the trainer really ran
        cell = json.loads((d / "cell.json").read_text())
        assert cell["seed"] == s and cell["variant"] == k and cell["attempts"][-1]["returncode"] == 0
        assert f"seed={s}" in cell["argv"] and f"output_dir={d}" in cell["argv"]
        assert (d / "train.log").read_text().startswith(f"$ {cell['command']}\n")
        assert "packages" in cell["attempts"][-1]["provenance"]

    summary = json.loads((out / "summary.json").read_text())
    for k in ("res", "dhc2"):
        top1 = [results[(k, s)]["top1"] for s in (0, 1)]
        row = summary["table"][k]["metrics"]["top1"]
        assert row["n"] == 2 and row["mean"] == pytest.approx(statistics.mean(top1))
        assert row["std"] == pytest.approx(statistics.stdev(top1))
    pair = summary["paired"]["top1"]["dhc2"]
    diffs = [results[("dhc2", s)]["top1"] - results[("res", s)]["top1"] for s in (0, 1)]
    assert pair["baseline"] == "res" and pair["diffs"] == pytest.approx(diffs)
    md = (out / "summary.md").read_text()
    assert "| `res` | 2 |" in md and "| `dhc2` − `res` | 2 |" in md
    assert f"python -m hcvision.compare {' '.join(args)}" in md  # names the command that regenerates it
    assert (out / "curves_train_loss.png").stat().st_size > 1000
    # the trainer logs connection diagnostics for dhc2 (none for res); the report draws them
    assert (out / "curves_conn_res_dist_mean.png").stat().st_size > 1000
    assert summary["curves_data"]["dhc2"]["0"]["conn/res_dist_mean"] and "conn/res_dist_mean" not in \
        summary["curves_data"]["res"]["0"]

    # Skip finished: nothing runs again, results untouched.
    stamp = {key: (d / "results.json").stat().st_mtime_ns for key, d in run_dirs.items()}
    capsys.readouterr()
    assert main(list(args)) == 0
    assert "0 run(s) now, 4 already finished" in capsys.readouterr().out
    assert stamp == {key: (d / "results.json").stat().st_mtime_ns for key, d in run_dirs.items()}

    # Resume: a run that has its checkpoint but no results (killed after the checkpoint) continues, not restarts.
    victim = run_dirs[("dhc2", 1)]
    (victim / "results.json").unlink()
    (victim / "model.safetensors").unlink()
    assert main(list(args)) == 0
    assert "1 run(s) now, 3 already finished" in capsys.readouterr().out
    attempts = json.loads((victim / "cell.json").read_text())["attempts"]
    assert len(attempts) == 2 and attempts[-1]["resumed"] is True
    assert "resumed from" in (victim / "train.log").read_text()
    assert json.loads((victim / "results.json").read_text())["top1"] == results[("dhc2", 1)]["top1"]

    # Aggregate from any directory: a copy without the runner's cell.json; labels come from the model names.
    shared = tmp_path / "shared"
    shutil.copytree(out / "runs", shared / "elsewhere")
    for f in shared.rglob("cell.json"):
        f.unlink()
    runs, unfinished = collect_runs([shared])
    assert not unfinished and sorted((r.variant, r.seed) for r in runs) == sorted(
        [("dhc2", 0), ("dhc2", 1), ("res", 0), ("res", 1)])
    assert main(["aggregate", str(shared), "--out", str(tmp_path / "agg"), "--no-plots"]) == 0
    agg = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert agg["paired"]["top1"]["dhc2"]["mean"] == pytest.approx(statistics.mean(diffs))


def test_report_pairs_within_the_same_grid_context(tmp_path):
    """With a second axis, dhc2 lr=a is paired with res lr=a, not with res lr=b."""
    from hcvision.compare.report import Run

    def run(kind, lr, seed, top1):
        cell = {"variant": f"{kind} lr={lr}", "kind": kind, "context": f"lr={lr}", "seed": seed}
        return Run(tmp_path, {"top1": top1}, {}, cell, {"train/loss": [(1, 1.0)]}, cell["variant"], kind,
                   cell["context"])

    runs = [run("res", 1, 0, 90.0), run("res", 1, 1, 91.0), run("res", 2, 0, 50.0), run("res", 2, 1, 52.0),
            run("dhc2", 1, 0, 92.0), run("dhc2", 1, 1, 92.5), run("dhc2", 2, 0, 51.0), run("dhc2", 2, 1, 51.0)]
    for r in runs:
        r.variant, r.kind, r.context = r.cell["variant"], r.cell["kind"], r.cell["context"]
    rep = build_report(runs)
    assert rep["paired"]["top1"]["dhc2 lr=1"]["baseline"] == "res lr=1"
    assert rep["paired"]["top1"]["dhc2 lr=1"]["diffs"] == [2.0, 1.5]
    assert rep["paired"]["top1"]["dhc2 lr=2"]["diffs"] == [1.0, -1.0]


# ---------------------------------------------------------------------------------------------------------------
# Emitted commands and Slurm script
# ---------------------------------------------------------------------------------------------------------------
def test_emit_commands_and_slurm_array(tmp_path, monkeypatch, capsys):
    out = tmp_path / "emit"
    base = ["run", "--config", CONFIG, "--kinds", "res,shc2", "--seeds", "0-1", "--out", str(out), *FAST]
    assert main([*base, "--emit", "commands"]) == 0
    spec = build_spec(CONFIG, out=str(out), kinds="res,shc2", seeds="0-1", overrides=FAST)
    lines = [line for line in (out / "commands.sh").read_text().splitlines() if not line.startswith("#")]
    assert lines == [c.shell_line for c in spec.cells] and len(lines) == 4
    assert all("resume=auto" in line and "results.json ] ||" in line and "OMP_NUM_THREADS=1" in line for line in lines)
    assert subprocess.run(["bash", "-n", str(out / "commands.sh")]).returncode == 0
    # The runs get their labels now, so aggregating cluster output labels them like the local runner does.
    assert json.loads((spec.cells[3].run_dir / "cell.json").read_text())["variant"] == "shc2"

    monkeypatch.setattr("hcvision.compare.emit.submitit_available", lambda: True)
    assert main([*base, "--emit", "slurm", "--slurm-parallel", "3", "--slurm-option=--gres=gpu:1",
                 "--slurm-time", "00:30:00"]) == 0
    sbatch = out / "slurm_array.sbatch"
    text = sbatch.read_text()
    assert "#SBATCH --array=0-3%3" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH --time=00:30:00" in text
    for i, cell in enumerate(spec.cells):  # array task i runs cell i, character for character
        dry = subprocess.run(["bash", str(sbatch)], env=dict(os.environ, DRY_RUN="1", SLURM_ARRAY_TASK_ID=str(i)),
                             capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.strip() == cell.shell_line
    launcher = (out / "slurm_submitit.py").read_text()
    compile(launcher, "slurm_submitit.py", "exec")
    namespace: dict = {}
    exec(launcher.split("import submitit", 1)[1].split("executor =", 1)[0], namespace)  # just the COMMANDS list
    assert namespace["COMMANDS"] == [c.shell_line for c in spec.cells]
    assert "'slurm_array_parallelism': 3" in launcher and "'gres': 'gpu:1'" in launcher


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the problem and what is accepted, nothing written
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--kinds", "res,dhc2", "lrr=1e-3"], "unknown config key 'lrr'"),
    (["--kinds", "res,xyz2"], "unknown connection kind 'xyz2'"),
    (["--kinds", "res,dhc0"], "unknown connection kind 'dhc0'"),
    (["--kinds", ","], "names no kind"),
    (["--grid", "lr="], "no values"),
    (["--grid", "epochs=1,x"], "epochs='x'"),
    (["--seeds", "3-1"], "is not a seed"),
    (["--kinds", "res", "seed=3"], "set per cell by the runner"),
    (["--kinds", "res", "--jobs", "0"], "--jobs 0"),
    (["--kinds", "res", "--grid", "model=vit_digits_patch2_8_res"], "both choose the model"),
])
def test_bad_input_exits_2_before_writing(tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    assert main(["run", "--config", CONFIG, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "error" in err
    assert not out.exists()


def test_bad_input_missing_config_and_sources(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.yaml" in err and "accepted" in err
    assert main(["aggregate", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["aggregate", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:  # argparse errors: exit 2, one line
        main(["run", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_dit_grid_and_fid_report(tmp_path, capsys):
    """A DiT config goes to train_dit.py; its runs are reported by FID (lower is better) and cls_acc."""
    spec = build_spec(str(REPO / "configs" / "dit" / "dit_digits_shc2.yaml"), out=str(tmp_path / "o"),
                      kinds="res,shc2,mhc2", seeds="0-2")
    assert spec.trainer == "dit" and len(spec.cells) == 9
    assert all(c.argv[1:3] == ["-m", "hcvision.train_dit"] for c in spec.cells)
    assert [a for a in spec.cells[8].argv if a.startswith("model=")] == ["model=dit_digits_2_mhc2"]
    fid = {("res", 0): 30.0, ("res", 1): 32.0, ("shc2", 0): 27.0, ("shc2", 1): 30.5}
    for (kind, seed), f in fid.items():  # runs made elsewhere: only results.json, config.yaml, metrics.jsonl
        d = tmp_path / "cluster" / f"job{kind}{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"model": f"dit_digits_2_{kind}", "fid": f, "cls_acc": 90.0 + seed}))
        (d / "config.yaml").write_text(f"model: dit_digits_2_{kind}\nseed: {seed}\noutput_dir: {d}\nlr: 0.002\n")
        (d / "metrics.jsonl").write_text('{"step": 50, "train/loss": 0.5}\n{"step": 100, "train/loss": 0.25}\n')
    assert main(["aggregate", str(tmp_path / "cluster"), "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert rep["metrics"] == ["fid", "cls_acc", "final_loss"] and rep["higher_is_better"]["fid"] is False
    assert rep["paired"]["fid"]["shc2"]["diffs"] == [-3.0, -1.5]
    assert rep["table"]["res"]["metrics"]["final_loss"]["mean"] == 0.25
    assert "(lower is better)" in (tmp_path / "rep" / "summary.md").read_text()


def _fake_run(d: Path, kind: str, seed: int, top1: float) -> Path:
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"model": f"vit_digits_patch2_8_{kind}", "top1": top1}))
    (d / "config.yaml").write_text(f"model: vit_digits_patch2_8_{kind}\nseed: {seed}\noutput_dir: {d}\n")
    return d


def test_aggregate_skips_damaged_runs_and_grid_record_with_a_warning(tmp_path, capsys):
    """One damaged results.json, cell.json or config.yaml, or a damaged compare.json, does not take the report down:
    each is named in a warning and counted as missing in summary.md; the readable runs are reported."""
    src = tmp_path / "grid" / "runs"
    for i, (kind, seed, top1) in enumerate([("res", 0, 90.0), ("res", 1, 91.0), ("dhc2", 0, 92.0), ("dhc2", 1, 93.0)]):
        _fake_run(src / f"r{i}", kind, seed, top1)
    (src / "r1" / "results.json").write_text('{"top1": 91.0, "mod')  # cut by a full disk
    (src / "r3" / "cell.json").write_text("[1, 2]")  # not an object
    _fake_run(src / "r4", "dhc2", 2, 94.0)
    (src / "r4" / "config.yaml").write_text("model: [unclosed\n")
    (tmp_path / "grid" / "compare.json").write_bytes(b"\x00\x01 not json")
    out = tmp_path / "report"
    assert main(["aggregate", str(src), "--out", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    for name in ("r1/results.json", "r3/cell.json", "r4/config.yaml", "grid/compare.json"):
        assert "warning: skipped" in err and name in err, (name, err)
    assert "Traceback" not in err
    summary = (out / "summary.md").read_text()
    assert "4 file(s) unreadable (counted as missing)" in summary
    rep = json.loads((out / "summary.json").read_text())
    assert rep["num_runs"] == 2 and {v: t["seeds"] for v, t in rep["table"].items()} == {"res": [0], "dhc2": [0]}
    assert len(rep["unreadable"]) == 4


def test_aggregate_refuses_only_when_nothing_readable_is_left(tmp_path, capsys):
    src = tmp_path / "runs"
    _fake_run(src / "a", "res", 0, 90.0)
    (src / "a" / "results.json").write_text("{")
    assert main(["aggregate", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished runs" in err and "a/results.json" in err
    assert not (tmp_path / "o").exists()
