"""Bad input to ``python -m hcvision.eval.generative``: exit 2, one line naming the problem, nothing computed or
written.

Every case runs the CLI's entry point (``run_cli(main)``) in a process of its own: one driver process imports
hcvision once and forks a child per case (a fresh interpreter per case would cost ~7 s of CPU each), with its stderr in
a file and its exit status from ``waitpid``; one case also runs as a genuine ``python -m`` subprocess. Per case the
driver records which files under the work directory appeared or changed. A planted pickle (an object whose
``__reduce__`` would create a marker file) is offered as Inception weights and must never run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m hcvision.eval.generative"

DRIVER = r"""
import json, os, sys, traceback
from pathlib import Path
from hcvision.cli import run_cli
from hcvision.eval.generative import PROG, main

def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}

cases, work, logs = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], Path(sys.argv[3])
results = {}
for case in cases:
    before = snapshot(work)
    pid = os.fork()
    if pid == 0:
        for stream, name in ((1, "out"), (2, "err")):
            fd = os.open(logs / f"{case['name']}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, stream)
        for key in case.get("unset", []):
            os.environ.pop(key, None)
        os.environ.update(case.get("env", {}))
        try:
            code = run_cli(main, case["argv"], PROG)
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what the interpreter would do with an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    after = snapshot(work)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    results[case["name"]] = {"rc": os.waitstatus_to_exitcode(status), "changed": changed}
Path(logs / "results.json").write_text(json.dumps(results))
"""


class _Evil:
    """Unpickling this would create a file: proves no pickle code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Inputs for every case (cheap: 8x8 images, a depth-1 digits classifier); the work directory is watched."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    import hcvision.models  # noqa: F401
    from hcvision.eval import FeatureStats, save_digits_classifier, save_stats

    root = tmp_path_factory.mktemp("eval_cli")
    work, logs = root / "work", root / "logs"
    work.mkdir()
    logs.mkdir()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    f = {
        "gen": _npz(work / "gen.npz", arr_0=imgs),
        "ref": _npz(work / "ref.npz", arr_0=imgs[::-1].copy()),
        "no_arr0": _npz(work / "no_arr0.npz", images=imgs),
        "float": _npz(work / "float.npz", arr_0=imgs.astype(np.float32) / 255),
        "rgba": _npz(work / "rgba.npz", arr_0=np.zeros((10, 8, 8, 4), np.uint8)),
        "empty": _npz(work / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8)),
        "one": _npz(work / "one.npz", arr_0=imgs[:1]),
        "bad_labels": _npz(work / "bad_labels.npz", arr_0=imgs, arr_1=np.arange(3)),
        "labels_11": _npz(work / "labels_11.npz", arr_0=imgs, arr_1=np.full(10, 11)),
        "not_npz": str(work / "not_npz.npz"),
        "objects": _npz(work / "objects.npz", arr_0=np.array([{"a": 1}, None], dtype=object)),
        "a_file": str(work / "a_file.txt"),
        "marker": str(root / "pwned"),
    }
    Path(f["not_npz"]).write_bytes(b"this is not a zip archive")
    Path(f["a_file"]).write_text("a regular file\n")
    mixed = work / "mixed"
    mixed.mkdir()
    Image.fromarray(imgs[0]).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(mixed / "b.png")
    f["mixed"] = str(mixed)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": _Evil(f["marker"])}, work / "evil.pth")
    f["evil"] = str(work / "evil.pth")

    torch.manual_seed(0)
    tiny = dict(embed_dim=32, depth=1, num_heads=2)
    model = timm.create_model("vit_digits_patch2_8_res", **tiny).eval()
    f["clf"] = str(save_digits_classifier(model, work / "clf.safetensors", "vit_digits_patch2_8_res", tiny))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    meta = {"model": "vit_digits_patch2_8_res", "model_kwargs": json.dumps(tiny)}
    save_file(state, str(work / "nan_clf.safetensors"), metadata=meta)
    f["nan_clf"] = str(work / "nan_clf.safetensors")
    deeper = timm.create_model("vit_digits_patch2_8_res", **{**tiny, "depth": 2})  # recorded as depth 1
    save_file(deeper.state_dict(), str(work / "deeper_clf.safetensors"), metadata=meta)
    f["deeper_clf"] = str(work / "deeper_clf.safetensors")
    feats = rng.normal(size=(10, 32)).astype(np.float32)
    other = FeatureStats(mu=feats.mean(0).astype(np.float64), sigma=np.cov(feats, rowvar=False),
                         feature_extractor="hcv-digits", weights_sha256="0" * 64, num_samples=10, features=feats)
    f["other_stats"] = str(save_stats(work / "other_weights_stats.npz", other))
    bad_json = work / "prov.json"
    bad_json.write_text("{not json")
    f["bad_json"] = str(bad_json)
    return root, work, logs, f


def _cases(f: dict, logs: Path) -> list[tuple[str, list[str], dict, list[str]]]:
    """(name, argv, extra env, substrings the one error line must contain)."""
    inc = ["--inception-weights", f["evil"]]
    dig = ["--feature-extractor", "hcv-digits", "--weights", f["clf"], "--device", "cpu"]
    offline = {"TORCH_HOME": str(logs / "torch_home"), "https_proxy": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    return [
        ("pickle_inception", ["--gen", f["gen"], "--ref", f["ref"], *inc], {}, ["evil.pth", "safely"]),
        ("npz_without_arr_0", ["--gen", f["no_arr0"], "--ref", f["ref"], *inc], {}, ["no_arr0.npz", "arr_0"]),
        ("float_array", ["--gen", f["float"], "--ref", f["ref"], *inc], {}, ["float.npz", "uint8", "float32"]),
        ("four_channels", ["--gen", f["rgba"], "--ref", f["ref"], *inc], {}, ["rgba.npz", "(10, 8, 8, 4)"]),
        ("empty_set", ["--gen", f["gen"], "--ref", f["empty"], *inc], {}, ["empty.npz", "empty"]),
        ("labels_wrong_length", ["--gen", f["bad_labels"], "--ref", f["ref"], *dig], {}, ["bad_labels.npz:arr_1",
                                                                                          "(10,)"]),
        ("labels_out_of_range", ["--gen", f["labels_11"], "--ref", f["ref"], *dig], {}, ["[11, 11]", "0..9"]),
        ("out_under_a_file", ["--gen", f["gen"], "--ref", f["ref"], *inc, "--out", f["a_file"] + "/r.json"], {},
         ["a_file.txt", "is a file"]),
        ("ref_stats_under_a_file", ["--ref", f["ref"], "--write-ref-stats", f["a_file"] + "/s.npz", *inc], {},
         ["a_file.txt", "is a file"]),
        ("ref_stats_suffix", ["--ref", f["ref"], "--write-ref-stats", str(Path(f["gen"]).parent / "s.json"), *inc],
         {}, ["s.json", ".npz"]),
        # gen is bad: the reference statistics must not be written first
        ("bad_gen_with_write_ref_stats", ["--gen", f["float"], "--ref", f["ref"], *dig, "--write-ref-stats",
                                          str(Path(f["gen"]).parent / "new_stats.npz")], {}, ["float.npz"]),
        ("fid_of_one_image", ["--gen", f["one"], "--ref", f["ref"], "--no-isc", "--no-prc", *inc], {},
         ["FID", "at least 2 samples", "gen has 1"]),
        ("prc_k_too_large", ["--gen", f["gen"], "--ref", f["ref"], "--prc-k", "10", "--no-isc", *inc], {},
         ["prc_k=10", "[1, 9]"]),
        ("mixed_image_sizes", ["--gen", f["mixed"], "--ref", f["ref"], "--no-isc", "--no-prc", *inc], {},
         ["mixed", "different sizes", "8x8", "8x9"]),
        ("not_an_npz", ["--gen", f["not_npz"], "--ref", f["ref"], *inc], {}, ["not_npz.npz", "not a readable"]),
        # feature-extractor weights of another network: refused naming tensors, before any image is processed
        ("inception_weights_of_another_network", ["--gen", f["gen"], "--ref", f["ref"], "--inception-weights",
                                                  f["clf"]], {}, ["clf.safetensors", "InceptionV3", "missing keys"]),
        ("digits_classifier_of_another_depth", ["--gen", f["gen"], "--ref", f["ref"], "--feature-extractor",
                                                "hcv-digits", "--weights", f["deeper_clf"], "--device", "cpu"], {},
         ["deeper_clf.safetensors", "blocks.1.attn"]),
        ("npz_of_python_objects", ["--gen", f["objects"], "--ref", f["ref"], *inc], {},
         ["objects.npz", "'arr_0'", "Python objects"]),
        ("dinov2_weights_of_another_network", ["--gen", f["gen"], "--ref", f["ref"], "--fd-dinov2", "--dinov2-weights",
                                               f["clf"], *dig], {},
         ["clf.safetensors", "patch_embed.proj.weight", "(32, 1, 2, 2)"]),
        ("missing_gen", ["--gen", f["gen"] + ".missing", "--ref", f["ref"], *inc], {}, ["gen.npz.missing",
                                                                                        "does not exist"]),
        ("inception_weights_missing_file", ["--gen", f["gen"], "--ref", f["ref"], "--inception-weights",
                                            f["gen"] + ".pth"], {}, ["gen.npz.pth", "does not exist"]),
        ("inception_weights_offline", ["--gen", f["gen"], "--ref", f["ref"]], offline,
         ["--inception-weights", "HCV_INCEPTION_WEIGHTS", "downloading failed"]),
        ("nan_digits_classifier", ["--gen", f["gen"], "--ref", f["ref"], "--feature-extractor", "hcv-digits",
                                   "--weights", f["nan_clf"], "--device", "cpu"], {},
         ["nan_clf.safetensors", "NaN", "blocks.0.attn.qkv.weight"]),
        ("stats_of_other_weights", ["--gen", f["gen"], "--ref", f["other_stats"], *dig], {},
         ["other_weights_stats.npz", "different hcv-digits weights"]),
        ("sfid_with_digits", ["--gen", f["gen"], "--ref", f["ref"], "--sfid", *dig], {}, ["sFID", "hcv-digits"]),
        ("fd_dinov2_without_weights", ["--gen", f["gen"], "--ref", f["ref"], "--fd-dinov2", *dig], {},
         ["--dinov2-weights", "HCV_DINOV2_WEIGHTS"]),
        ("provenance_not_json", ["--gen", f["gen"], "--ref", f["ref"], *dig, "--provenance", f["bad_json"]], {},
         ["prov.json", "JSON"]),
        ("provenance_bad_steps", ["--gen", f["gen"], "--ref", f["ref"], *dig, "--sampling-steps", "0"], {},
         ["--sampling-steps=0", "an integer in [1, 1000]"]),
        ("device_tpu", ["--gen", f["gen"], "--ref", f["ref"], *dig[:-2], "--device", "tpu"], {}, ["'tpu'", "cpu"]),
        ("gen_missing", ["--ref", f["ref"], *inc], {}, ["--gen is required"]),
    ]


@pytest.mark.slow  # one interpreter start-up (~7 s of CPU) plus ~25 forked cases
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(setup):
    root, work, logs, f = setup
    cases = _cases(f, logs)
    spec = [{"name": n, "argv": argv, "env": env,
             "unset": ["HCV_INCEPTION_WEIGHTS", "HCV_DIGITS_CLASSIFIER", "HCV_DIGITS_MODEL_NAME", "HCV_DINOV2_WEIGHTS"]}
            for n, argv, env, _ in cases]
    (logs / "cases.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(logs / "cases.json"), str(work), str(logs)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((logs / "results.json").read_text())
    failures = []
    for name, _, _, needles in cases:
        err = (logs / f"{name}.err").read_text()
        lines = err.strip().splitlines()
        problems = []
        if results[name]["rc"] != 2:
            problems.append(f"exit {results[name]['rc']}")
        if "Traceback" in err:
            problems.append("traceback")
        if len(lines) != 1 or not lines[0].startswith(f"{PROG}: error: "):
            problems.append(f"{len(lines)} stderr lines")
        problems += [f"no {n!r}" for n in needles if n not in err]
        if results[name]["changed"]:
            problems.append(f"wrote {results[name]['changed']}")
        if (logs / f"{name}.out").read_text():
            problems.append("printed results")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    {err.strip()[:400]}")
    assert not failures, "\n".join(failures)
    assert not Path(f["marker"]).exists(), "a pickle payload was executed"
    assert len(cases) >= 25


@pytest.mark.slow  # a genuine `python -m` start-up
def test_module_entry_point_maps_errors_to_exit_2(setup):
    """``python -m hcvision.eval.generative`` itself goes through run_cli (no __getattr__ hack, no traceback)."""
    root, work, logs, f = setup
    env = {k: v for k, v in os.environ.items() if not k.startswith("HCV_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "hcvision.eval.generative", "--gen", f["gen"], "--ref", f["ref"],
                           "--inception-weights", f["evil"], "--out", str(work / "r.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeWarning" not in proc.stderr
    assert proc.stderr.startswith(f"{PROG}: error: could not load InceptionV3 weights from ")
    assert not (work / "r.json").exists() and not Path(f["marker"]).exists()
