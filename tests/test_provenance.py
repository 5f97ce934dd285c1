"""hcvision.provenance.run_provenance: code version, packages, interpreter, device."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hcvision.provenance import PACKAGES, code_version, run_provenance

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_run_provenance_fields_and_json():
    p = run_provenance()
    json.dumps(p)  # JSON-ready as it is
    assert set(PACKAGES) <= set(p["packages"])
    assert p["packages"]["torch"] == importlib.metadata.version("torch")
    assert p["packages"]["timm"] == importlib.metadata.version("timm")
    assert p["python"] == sys.version.split()[0] and p["executable"] == sys.executable
    assert p["device"]["type"] in ("cpu", "cuda", "mps")
    assert isinstance(p["platform"], str) and p["platform"]


@pytest.mark.skipif(subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0,
                    reason="not a git checkout")
def test_code_version_matches_git():
    v = code_version()
    assert v["commit"] == _git("rev-parse", "HEAD")
    assert v["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))


def test_code_version_dirty_flag_and_outside_a_checkout(tmp_path):
    assert code_version(tmp_path)["commit"] is None and code_version(tmp_path)["dirty"] is None
    repo = tmp_path / "r"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    (repo / "a.txt").write_text("1")
    _git("add", "a.txt", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=repo)
    clean = code_version(repo)
    assert clean["commit"] == _git("rev-parse", "HEAD", cwd=repo) and clean["dirty"] is False
    (repo / "untracked.txt").write_text("run output")  # untracked files do not change the code
    assert code_version(repo)["dirty"] is False
    (repo / "a.txt").write_text("2")
    assert code_version(repo)["dirty"] is True
    # A package installed inside another repository (a venv in a project folder) does not take that repository's
    # commit as its own.
    inner = repo / ".venv" / "site-packages"
    inner.mkdir(parents=True)
    assert code_version(inner)["commit"] is None
