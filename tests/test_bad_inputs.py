"""Every entry point on a catalogue of bad inputs, each run as its own process (see ``cli_runner``).

For each case: exit code 2, no traceback, a message naming the problem, nothing written or changed under the
workspace, and planted pickles (objects whose unpickling would create a marker file) never executed.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import hcvision  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = ["model=vit_digits_patch2_8_dhc2", "model_kwargs.embed_dim=32", "model_kwargs.depth=2",
            "progress_bar=false", "tensorboard=false"]
TINY_VIT_KWARGS = {"embed_dim": 32, "depth": 2}


class _Planted:
    """Unpickling this creates ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _png(path: Path, value: int = 128, size: int = 8, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size) if mode == "L" else (size, size, 3), value, np.uint8)).save(path)


def _folder(root: Path, classes=("a", "b"), splits=("train", "val"), n: int = 3) -> Path:
    for split in splits:
        for c in classes:
            for i in range(n):
                _png(root / split / c / f"{i}.png", 40 * i)
    return root


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, runner):
    """A workspace of good and bad files, built once; cases must leave it exactly as it is."""
    root = tmp_path_factory.mktemp("bad_inputs")
    w = {"root": root, "runner": runner, "marker": root / "PWNED"}
    torch.manual_seed(0)
    vit = timm.create_model("vit_digits_patch2_8_dhc2", **TINY_VIT_KWARGS)
    meta = {"model": "vit_digits_patch2_8_dhc2", "model_kwargs": json.dumps(TINY_VIT_KWARGS)}
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(sd, str(root / "vit.safetensors"), metadata=meta)
    nan = dict(sd)
    nan["blocks.0.attn.qkv.weight"] = torch.full_like(sd["blocks.0.attn.qkv.weight"], float("nan"))
    save_file(nan, str(root / "vit_nan.safetensors"), metadata=meta)
    seven = {**sd, "head.weight": torch.zeros(7, 32), "head.bias": torch.zeros(7)}
    save_file(seven, str(root / "vit_7cls.safetensors"), metadata=meta)
    (root / "truncated.safetensors").write_bytes((root / "vit.safetensors").read_bytes()[:300])
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    torch.save({"state_dict": _Planted(str(w["marker"]))}, root / "planted.pth.tar")
    (root / "planted.safetensors").write_bytes((root / "planted.pth.tar").read_bytes())
    dit = timm.create_model("dit_digits_2_shc2")
    dmeta = {"model": "dit_digits_2_shc2", "model_kwargs": "{}"}
    dsd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(dsd, str(root / "dit.safetensors"), metadata=dmeta)
    dnan = {**dsd, "final_layer.linear.weight": torch.full_like(dsd["final_layer.linear.weight"], float("inf"))}
    save_file(dnan, str(root / "dit_nan.safetensors"), metadata=dmeta)
    (root / "a_file").write_text("x")
    if os.geteuid() != 0:
        (root / "read_only").mkdir()
        (root / "read_only").chmod(0o555)
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "unknown_key.yaml").write_text("lrr: 0.1\n")
    (root / "bad_yaml.yaml").write_text("epochs: [1\n")
    _folder(root / "images")
    _folder(root / "no_val", splits=("train",))
    _folder(root / "empty_class")
    (root / "empty_class" / "train" / "c").mkdir()
    _folder(root / "other_classes")
    shutil.rmtree(root / "other_classes" / "val" / "b")
    _folder(root / "other_classes", classes=("z",), splits=("val",))
    for p in _folder(root / "unreadable").rglob("*.png"):
        p.write_bytes(b"\x89PNG broken")
    # A real run with two checkpoints to resume from, then damaged copies of it.
    r = runner.run(str(REPO / "train_cls.py"), TINY_VIT + ["epochs=1", "max_steps=2", "checkpoint_every=1",
                   f"output_dir={root / 'run'}", "global_batch_size=64"], cwd=str(root))
    assert r.returncode == 0, r.stderr
    ckpt = sorted((root / "run" / "checkpoints").iterdir())[-1]
    damaged = {
        "run_trunc_opt": lambda d: (d / "optimizer.bin").write_bytes((d / "optimizer.bin").read_bytes()[:100]),
        "run_bad_state": lambda d: (d / "train_state.json").write_text("{not json"),
        "run_list_state": lambda d: (d / "train_state.json").write_text("[1, 2]"),
        "run_nan": lambda d: save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                        for k, v in load_file(str(d / "model.safetensors")).items()},
                                       str(d / "model.safetensors")),
        "run_trunc_model": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 50),
        "run_trunc_rng": lambda d: (d / "random_states_0.pkl").write_bytes(b"\x80\x04"),
        "run_planted_rng": lambda d: torch.save(_Planted(str(w["marker"])), d / "random_states_0.pkl"),
    }
    for name, damage in damaged.items():
        shutil.copytree(root / "run", root / name)
        for d in (root / name / "checkpoints").iterdir():
            damage(d)
    w["ckpt"] = ckpt
    return w


def _args(ws, args):
    return [a.format(root=ws["root"], ckpt=ws["ckpt"], repo=REPO) for a in args]


CLS, DIT = str(REPO / "train_cls.py"), str(REPO / "train_dit.py")
SAMPLE, EVAL, ANALYSIS, LATENTS = "hcvision.sample", "hcvision.eval.generative", "hcvision.analysis", \
    "hcvision.data.latents"
COMPARE = "hcvision.compare"
OUT = "output_dir={root}/new_run"
# A location that cannot be written: under /sys for root (who ignores permission bits), else a read-only directory
NO_WRITE = "/sys/hcvision_cannot_write_here" if os.geteuid() == 0 else "{root}/read_only/out"
D_OUT = ["output_dir={root}/new_dit", "progress_bar=false", "tensorboard=false"]

# (id, entry point, arguments, regex the message must match)
CASES = [
    # -- configuration --------------------------------------------------------------------------------------
    ("cls-unknown-key", CLS, TINY_VIT + [OUT, "lrr=0.1"], r"lrr"),
    ("cls-bad-type", CLS, TINY_VIT + [OUT, "epochs=abc"], r"epochs"),
    ("cls-epochs-zero", CLS, TINY_VIT + [OUT, "epochs=0"], r"epochs=0"),
    ("cls-negative-lr", CLS, TINY_VIT + [OUT, "lr=-1"], r"lr=-1"),
    ("cls-nan-lr", CLS, TINY_VIT + [OUT, "lr=nan"], r"lr="),
    ("cls-mixed-precision", CLS, TINY_VIT + [OUT, "mixed_precision=fp8"], r"mixed_precision"),
    ("cls-optimizer", CLS, TINY_VIT + [OUT, "opt=adamq"], r"opt='adamq'"),
    ("cls-schedule", CLS, TINY_VIT + [OUT, "lr_schedule=linear"], r"lr_schedule"),
    ("cls-smoothing", CLS, TINY_VIT + [OUT, "smoothing=1.5"], r"smoothing"),
    ("cls-batch-accum", CLS, TINY_VIT + [OUT, "global_batch_size=33", "grad_accum_steps=2"], r"global_batch_size=33"),
    ("cls-config-missing", CLS, ["--config", "{root}/nope.yaml", OUT], r"nope.yaml"),
    ("cls-config-list", CLS, ["--config", "{root}/list.yaml", OUT], r"list.yaml"),
    ("cls-config-unknown", CLS, ["--config", "{root}/unknown_key.yaml", OUT], r"lrr"),
    ("cls-config-bad-yaml", CLS, ["--config", "{root}/bad_yaml.yaml", OUT], r"bad_yaml.yaml"),
    ("cls-eval-without-checkpoint", CLS, TINY_VIT + ["eval_only=true"], r"checkpoint"),
    ("cls-checkpoint-without-eval", CLS, TINY_VIT + [OUT, "checkpoint={root}/vit.safetensors"], r"eval_only"),
    # -- model and model kwargs -------------------------------------------------------------------------------
    ("cls-unknown-model", CLS, [OUT, "model=vit_digits_patch2_8_dhc3"], r"not a registered"),
    ("cls-kwarg-kind", CLS, TINY_VIT + [OUT, "model_kwargs.connection=dhcc"], r"dhcc"),
    ("cls-kwarg-rate", CLS, TINY_VIT + [OUT, "model_kwargs.rate=0"], r"rate"),
    ("cls-kwarg-unknown", CLS, TINY_VIT + [OUT, "model_kwargs.foo=1"], r"foo"),
    ("cls-kwarg-classes", CLS, TINY_VIT + [OUT, "model_kwargs.num_classes=7"], r"num_classes"),
    ("dit-not-a-dit", DIT, D_OUT + ["model=vit_digits_patch2_8_dhc2"], r"not a registered DiT"),
    ("dit-kwarg-kind", DIT, D_OUT + ["model_kwargs.connection=xhc"], r"xhc"),
    ("dit-kwarg-classes", DIT, D_OUT + ["model_kwargs.num_classes=7"], r"num_classes"),
    # -- data ---------------------------------------------------------------------------------------------------
    ("cls-data-missing", CLS, TINY_VIT + [OUT, "data_dir={root}/nope"], r"data_dir"),
    ("cls-data-no-val", CLS, TINY_VIT + [OUT, "data_dir={root}/no_val"], r"val/"),
    ("cls-data-empty-class", CLS, TINY_VIT + [OUT, "data_dir={root}/empty_class"], r"empty_class.*\bc\b"),
    ("cls-data-unreadable", CLS, TINY_VIT + [OUT, "data_dir={root}/unreadable"], r"could be decoded"),
    ("cls-data-other-classes", CLS, TINY_VIT + [OUT, "data_dir={root}/other_classes"], r"same class folders"),
    ("cls-data-img-size", CLS, TINY_VIT + [OUT, "data_dir={root}/images", "img_size=64"], r"img_size=64"),
    ("cls-data-is-file", CLS, TINY_VIT + [OUT, "data_dir={root}/a_file"], r"data_dir"),
    ("dit-data-not-latents", DIT, D_OUT + ["data_dir={root}/images"], r"latent"),
    ("dit-classifier-missing", DIT, D_OUT + ["digits_classifier={root}/nope.safetensors"], r"nope.safetensors"),
    ("dit-classifier-garbage", DIT, D_OUT + ["digits_classifier={root}/garbage.safetensors"], r"garbage"),
    # -- output paths ------------------------------------------------------------------------------------------
    ("cls-output-is-file", CLS, TINY_VIT + ["output_dir={root}/a_file"], r"not a directory"),
    ("cls-output-holds-run", CLS, TINY_VIT + ["output_dir={root}/run"], r"already holds a run"),
    ("dit-output-holds-run", DIT, ["output_dir={root}/run", "progress_bar=false"], r"already holds a run"),
    # every entry point: a location under a regular file, and one that cannot be written (checked by a probe)
    ("cls-output-under-file", CLS, TINY_VIT + ["output_dir={root}/a_file/run"], r"a_file.*regular file"),
    ("cls-output-unwritable", CLS, TINY_VIT + [f"output_dir={NO_WRITE}"], r"cannot be written"),
    ("dit-output-under-file", DIT, ["output_dir={root}/a_file/run", "progress_bar=false"], r"a_file.*regular file"),
    ("dit-output-unwritable", DIT, [f"output_dir={NO_WRITE}", "progress_bar=false"], r"cannot be written"),
    ("sample-out-unwritable", SAMPLE, ["--checkpoint", "{root}/dit.safetensors", "--num-samples", "2", "--out",
                                       NO_WRITE], r"cannot be written"),
    ("eval-out-unwritable", EVAL, ["--gen", "{root}/images/val/a", "--ref", "{root}/images/val/b", "--out",
                                   NO_WRITE + "/r.json", "--feature-extractor", "hcv-digits", "--weights",
                                   "{root}/vit.safetensors"], r"cannot be written"),
    ("analysis-out-under-file", ANALYSIS, ["--model", "vit_digits_patch2_8_res", "--out", "{root}/a_file/a"],
     r"a_file.*regular file"),
    ("analysis-out-unwritable", ANALYSIS, ["--model", "vit_digits_patch2_8_res", "--out", NO_WRITE],
     r"cannot be written"),
    ("latents-out-under-file", LATENTS, ["--data-dir", "{root}/images/train", "--out", "{root}/a_file/lat", "--vae",
                                         "none"], r"a_file.*regular file"),
    ("latents-out-unwritable", LATENTS, ["--data-dir", "{root}/images/train", "--out", NO_WRITE, "--vae", "none"],
     r"cannot be written"),
    ("compare-run-out-under-file", COMPARE, ["run", "--config", "digits_res", "--kinds", "res", "--out",
                                             "{root}/a_file/grid"], r"a_file.*regular file"),
    ("compare-run-out-unwritable", COMPARE, ["run", "--config", "digits_res", "--kinds", "res", "--out", NO_WRITE],
     r"cannot be written"),
    ("compare-aggregate-out-under-file", COMPARE, ["aggregate", "{root}/run", "--out", "{root}/a_file/report"],
     r"a_file.*regular file"),
    ("compare-aggregate-out-unwritable", COMPARE, ["aggregate", "{root}/run", "--out", NO_WRITE],
     r"cannot be written"),
    # -- checkpoints (evaluation) ------------------------------------------------------------------------------
    ("cls-eval-missing", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/nope.safetensors"], r"nope"),
    ("cls-eval-truncated", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/truncated.safetensors"],
     r"truncated.safetensors"),
    ("cls-eval-garbage", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/garbage.safetensors"], r"garbage"),
    ("cls-eval-planted", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/planted.pth.tar"], r"planted"),
    ("cls-eval-planted-st", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/planted.safetensors"], r"planted"),
    ("cls-eval-nan", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/vit_nan.safetensors"], r"NaN"),
    ("cls-eval-classes", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/vit_7cls.safetensors"], r"7 classes"),
    ("cls-eval-foreign", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/dit.safetensors"], r"dit.safetensors"),
    ("cls-eval-dir-without-weights", CLS, TINY_VIT + ["eval_only=true", "checkpoint={root}/images"], r"no weights"),
    ("cls-pretrained-dir-without-weights", CLS, TINY_VIT + [OUT, "pretrained={root}/images"],
     r"images.*directory without weights.*model.safetensors and pytorch_model.bin"),
    # -- resume ------------------------------------------------------------------------------------------------
    ("resume-not-a-checkpoint", CLS, TINY_VIT + [OUT, "resume={root}/images"], r"resume"),
    ("resume-missing", CLS, TINY_VIT + [OUT, "resume={root}/nope"], r"resume"),
    ("resume-truncated-optimizer", CLS, TINY_VIT + ["output_dir={root}/run_trunc_opt", "resume=auto"],
     r"optimizer.bin"),
    ("resume-garbage-state", CLS, TINY_VIT + ["output_dir={root}/run_bad_state", "resume=auto"],
     r"train_state.json"),
    ("resume-list-state", CLS, TINY_VIT + ["output_dir={root}/run_list_state", "resume=auto"], r"train_state.json"),
    ("resume-nan-weights", CLS, TINY_VIT + ["output_dir={root}/run_nan", "resume=auto"], r"NaN"),
    ("resume-truncated-weights", CLS, TINY_VIT + ["output_dir={root}/run_trunc_model", "resume=auto"],
     r"model.safetensors"),
    ("resume-truncated-rng", CLS, TINY_VIT + ["output_dir={root}/run_trunc_rng", "resume=auto"], r"random_states"),
    ("resume-planted-rng", CLS, TINY_VIT + ["output_dir={root}/run_planted_rng", "resume=auto"], r"random_states"),
    ("resume-other-model", CLS, ["model=vit_digits_patch2_8_res", "model_kwargs.embed_dim=32", "model_kwargs.depth=2",
                                 "output_dir={root}/run", "resume=auto", "progress_bar=false"], r"model="),
    ("resume-other-size", CLS, ["model=vit_digits_patch2_8_dhc2", "output_dir={root}/run", "resume=auto",
                                "progress_bar=false"], r"does not fit|shapes differ"),
    ("resume-dit-on-cls-run", DIT, ["output_dir={root}/run", "resume=auto", "progress_bar=false",
                                    "tensorboard=false"], r"model="),
    # -- DiT config --------------------------------------------------------------------------------------------
    ("dit-scheduler", DIT, D_OUT + ["sampler=foo"], r"sampler='foo'"),
    ("dit-cfg-nan", DIT, D_OUT + ["guidance_scale=nan"], r"guidance_scale=nan"),
    ("dit-dropout", DIT, D_OUT + ["class_dropout_prob=1"], r"class_dropout_prob"),
    ("dit-steps", DIT, D_OUT + ["sampling_steps=0"], r"sampling_steps=0"),
    ("dit-norm", DIT, D_OUT + ["diffusion_norm=-2"], r"diffusion_norm=-2"),
    ("dit-repa-encoder-of-another-network", DIT, D_OUT + ["repa_weight=0.5", "repa_block=2",
                                                          "repa_encoder={root}/vit.safetensors"],
     r"vit.safetensors.*patch_embed.proj.weight is \(32, 1, 2, 2\)"),
    # -- sampling ----------------------------------------------------------------------------------------------
    ("sample-missing", SAMPLE, ["--checkpoint", "{root}/nope", "--num-samples", "2", "--out", "{root}/s"], r"nope"),
    ("sample-truncated", SAMPLE, ["--checkpoint", "{root}/truncated.safetensors", "--num-samples", "2", "--out",
                                  "{root}/s"], r"truncated"),
    ("sample-planted", SAMPLE, ["--checkpoint", "{root}/planted.pth.tar", "--num-samples", "2", "--out", "{root}/s",
                                "--model", "dit_digits_2_shc2"], r"planted"),
    ("sample-nan", SAMPLE, ["--checkpoint", "{root}/dit_nan.safetensors", "--num-samples", "2", "--out", "{root}/s"],
     r"NaN"),
    ("sample-other-model", SAMPLE, ["--checkpoint", "{root}/dit.safetensors", "--model", "dit_digits_2_res",
                                    "--num-samples", "2", "--out", "{root}/s"], r"dit_digits_2_shc2"),
    ("sample-classifier-weights", SAMPLE, ["--checkpoint", "{root}/vit.safetensors", "--num-samples", "2", "--out",
                                           "{root}/s"], r"DiT"),
    ("sample-out-under-file", SAMPLE, ["--checkpoint", "{root}/dit.safetensors", "--num-samples", "2", "--out",
                                       "{root}/a_file/s"], r"a_file"),
    ("sample-bad-class", SAMPLE, ["--checkpoint", "{root}/dit.safetensors", "--num-samples", "2", "--out",
                                  "{root}/s", "--classes", "99"], r"99"),
    ("sample-zero-samples", SAMPLE, ["--checkpoint", "{root}/dit.safetensors", "--num-samples", "0", "--out",
                                     "{root}/s"], r"num-samples"),
    # -- generative evaluation ---------------------------------------------------------------------------------
    ("eval-gen-missing", EVAL, ["--gen", "{root}/nope.npz", "--ref", "{root}/images/val"], r"nope.npz"),
    ("eval-planted-inception", EVAL, ["--gen", "{root}/images/val/a", "--ref", "{root}/images/val/b",
                                      "--inception-weights", "{root}/planted.pth.tar", "--no-prc", "--no-isc"],
     r"planted"),
    ("eval-out-under-file", EVAL, ["--gen", "{root}/images/val/a", "--ref", "{root}/images/val/b", "--out",
                                   "{root}/a_file/r.json", "--feature-extractor", "hcv-digits", "--weights",
                                   "{root}/vit.safetensors"], r"a_file"),
    ("eval-nan-classifier", EVAL, ["--gen", "{root}/images/val/a", "--ref", "{root}/images/val/b",
                                   "--feature-extractor", "hcv-digits", "--weights", "{root}/vit_nan.safetensors",
                                   "--no-prc", "--no-isc"],
     r"NaN"),
    # -- analysis ----------------------------------------------------------------------------------------------
    ("analysis-unknown-model", ANALYSIS, ["--model", "vit_digits_patch2_8_dhx2", "--out", "{root}/a"], r"dhx2"),
    ("analysis-missing", ANALYSIS, ["--model", "vit_digits_patch2_8_dhc2", "--checkpoint", "{root}/nope.safetensors",
                                    "--out", "{root}/a"], r"nope"),
    ("analysis-planted", ANALYSIS, ["--model", "vit_digits_patch2_8_dhc2", "--checkpoint", "{root}/planted.pth.tar",
                                    "--out", "{root}/a"], r"planted"),
    ("analysis-nan", ANALYSIS, ["--model", "vit_digits_patch2_8_dhc2", "--checkpoint", "{root}/vit_nan.safetensors",
                                "--out", "{root}/a"], r"NaN"),
    ("analysis-other-model", ANALYSIS, ["--model", "vit_digits_patch2_8_res", "--checkpoint",
                                        "{root}/vit.safetensors", "--out", "{root}/a"], r"vit_digits_patch2_8_dhc2"),
    ("analysis-data", ANALYSIS, ["--model", "vit_digits_patch2_8_res", "--data", "{root}/nope", "--out", "{root}/a"],
     r"--data"),
    ("analysis-classes", ANALYSIS, ["--model", "vit_digits_patch2_8_res", "--classes", "a,b", "--out", "{root}/a"],
     r"--classes"),
    # -- latent extraction -------------------------------------------------------------------------------------
    ("latents-data-missing", LATENTS, ["--data-dir", "{root}/nope", "--out", "{root}/lat", "--vae", "none"],
     r"data_dir"),
    ("latents-vae-missing", LATENTS, ["--data-dir", "{root}/images/train", "--out", "{root}/lat", "--vae",
                                      "{root}/no_vae"], r"no_vae"),
    ("latents-image-size", LATENTS, ["--data-dir", "{root}/images/train", "--out", "{root}/lat", "--vae", "none",
                                     "--image-size", "0"], r"image_size"),
    ("latents-grey-vae", LATENTS, ["--data-dir", "{root}/images/train", "--out", "{root}/lat", "--vae",
                                   "{root}/no_vae", "--channels", "L"], r"channels"),
]


def test_catalogue_is_large_and_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(case, ws):
    import re

    name, target, args, pattern = case
    before = _snapshot(ws["root"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = ws["runner"].run(target, _args(ws, args), cwd=str(ws["root"]), env=env)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors and re.search(pattern, errors[-1]), r.stderr
    assert not ws["marker"].exists(), "a planted pickle was executed"
    assert _snapshot(ws["root"]) == before, "the failed command wrote or changed files"
