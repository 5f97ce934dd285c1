"""hcvision as installed software: a wheel built from this tree, installed outside the checkout, used from elsewhere.

The wheel must carry the recipes, the trained weights and the trainers (an editable install hides a gap there, so
this builds a real wheel, installs it with ``pip install --target`` and runs it from an empty directory with the
checkout off ``sys.path``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site dir holding the installed wheel, its console-script dir, the wheel's file names)."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"  # a copy, so that the build's own folders (build/, egg-info) never land in the checkout
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "docs", "benchmarks"))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("hcvision-*.whl")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True, capture_output=True)
    return site, site / "bin", zipfile.ZipFile(wheel).namelist()


def _run(site: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_weights_recipes_and_trainers(installed):
    _, _, names = installed
    index = json.loads((REPO / "weights" / "index.json").read_text())
    for entry in index.values():
        assert f"hcvision/weights/{entry['file']}" in names
    assert "hcvision/weights/index.json" in names
    for recipe in (REPO / "configs").rglob("*.yaml"):
        assert f"hcvision/configs/{recipe.relative_to(REPO / 'configs').as_posix()}" in names
    assert {"hcvision/train_cls.py", "hcvision/train_dit.py"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "configs/", "weights/"))]


def test_installed_wheel_works_from_another_directory(installed, tmp_path):
    site, bin_dir, _ = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    py = sys.executable

    # The installed package is the one imported (not the checkout), and the digits tag loads through timm.
    probe = ("import hcvision, timm, torch; print(hcvision.__file__); "
             "m = timm.create_model('vit_digits_patch2_8_dhc2.hcv_digits', pretrained=True); "
             "print(m(torch.zeros(1, 1, 8, 8)).shape[-1])")
    r = _run(site, work, py, "-c", probe)
    assert r.returncode == 0, r.stderr
    where, classes = r.stdout.split()
    assert Path(where).resolve().is_relative_to(site.resolve()) and classes == "10"

    # --help from the module and from the console script, each naming the command as typed.
    for cmd, prog, recipe in (
            ([py, "-m", "hcvision.train_cls", "--help"], "python -m hcvision.train_cls", "digits_dhc2"),
            ([str(bin_dir / "hcv-train-dit"), "-h"], "hcv-train-dit", "dit_digits_shc2")):
        r = _run(site, work, *cmd)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: {prog} [--config RECIPE|FILE ...]"), r.stdout[:200]
        assert recipe in r.stdout and "\noptimisation:\n" in r.stdout

    # Every console script fails like the modules: one line, exit 2.
    for script, args in (("hcv-sample", ["--checkpoint", "nope.safetensors", "--num-samples", "2", "--out", "s"]),
                         ("hcv-compare", ["run", "--config", "nope", "--out", "c"]),
                         ("hcv-train-cls", ["lr=-1"])):
        r = _run(site, work, str(bin_dir / script), *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr

    # A 1-epoch digits run from a recipe name, in this directory.
    r = _run(site, work, py, "-m", "hcvision.train_cls", "--config", "digits_res", "epochs=1", "output_dir=run",
             "progress_bar=false", "tensorboard=false")
    assert r.returncode == 0, r.stderr
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["model"] == "vit_digits_patch2_8_res" and results["epochs"] == 1 and 0 <= results["top1"] <= 100

    # A comparison grid from a recipe name: the cells run the installed trainer as a module, from this directory.
    r = _run(site, work, py, "-m", "hcvision.compare", "run", "--config", "digits_dhc2", "--kinds", "res,dhc2",
             "--seeds", "0-1", "--out", "grid", "--emit", "commands")
    assert r.returncode == 0, r.stderr
    script = (work / "grid" / "commands.sh").read_text()
    lines = [line for line in script.splitlines() if "-m hcvision.train_cls" in line]
    assert len(lines) == 4 and all(f"cd {work}" in line for line in lines), script
    assert not list((work / "grid").rglob("results.json"))  # --emit writes the commands, runs nothing

    # The demo (both trainers as modules, then the analysis CLI on their weights), tiny budget.
    r = _run(site, work, str(bin_dir / "hcv-demo"), "--out", "demo", "epochs=1", "max_steps=2", "tensorboard=false")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "DHC x2 - residual" in r.stdout
    for kind in ("dhc2", "res"):
        assert (work / "demo" / kind / "results.json").is_file()
        assert (work / "demo" / "analysis" / kind / "analysis.json").is_file()

