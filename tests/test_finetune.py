"""Fine-tuning in train_cls.py (issue 14 item 2): ``pretrained=`` from a file, a timm train.py checkpoint, a
``local-dir:`` export or a timm tag; the upcycled model at step 0 scores exactly what its residual source scores; a
head of another class count is reset (timm semantics); Hub sources fail offline with exit 2 before any write."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import hcvision  # noqa: F401  (registers the models)
from hcvision import train_cls
from hcvision.data import DigitsDataset
from hcvision.pretrained import create_pretrained, resolve_pretrained

REPO = Path(__file__).resolve().parents[1]
RES_WEIGHTS = REPO / "weights" / "vit_digits_patch2_8_res.hcv_digits.safetensors"
SMALL = dict(embed_dim=32, depth=2)
SMALL_ARGS = [f"model_kwargs.{k}={v}" for k, v in SMALL.items()] + ["progress_bar=false", "tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _perturbed(name: str, seed: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _val_logits(model: torch.nn.Module) -> torch.Tensor:
    ds = DigitsDataset("val", model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    with torch.no_grad():
        return model.eval()(ds.images)


@pytest.mark.slow
def test_upcycled_dhc2_scores_the_residual_top1_at_step_0(capsys):
    """The committed residual digits ViT (96.67 % in weights/index.json) upcycled to DHCx2: eval_only at step 0
    reports exactly the residual model's top-1/top-5, and the two networks agree sample by sample."""
    assert train_cls.main(["model=vit_digits_patch2_8_res", f"checkpoint={RES_WEIGHTS}", "eval_only=true"]) == 0
    source = _last_json(capsys)
    assert source["top1"] == pytest.approx(96.6667, abs=1e-3)  # the number weights/index.json records
    assert train_cls.main(["model=vit_digits_patch2_8_dhc2", f"pretrained={RES_WEIGHTS}", "eval_only=true"]) == 0
    upcycled = _last_json(capsys)
    assert (upcycled["top1"], upcycled["top5"]) == (source["top1"], source["top5"])
    assert upcycled["pretrained"]["sha256"] == hcvision.io.file_sha256(RES_WEIGHTS)

    # independently: same predictions, logits equal up to float rounding (the final LayerNorm absorbs the n-fold
    # read-out), while the model is really an HC model (its connections are there, at their init)
    ref = timm.create_model("vit_digits_patch2_8_res", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(RES_WEIGHTS)))
    model = create_pretrained("vit_digits_patch2_8_dhc2", resolve_pretrained(str(RES_WEIGHTS)))
    assert any("_conn." in k for k in model.state_dict())
    a, b = _val_logits(model), _val_logits(ref)
    assert torch.equal(a.argmax(1), b.argmax(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _digit_folder(root: Path, classes: int, per_class: int = 6) -> Path:
    """An ImageFolder (train/ and val/) of real digits images for the first ``classes`` digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True)
            idx = np.flatnonzero(d.target == c)[(0 if split == "train" else per_class):][:per_class]
            for i in idx:
                image = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), mode="L")
                image.save(root / split / str(c) / f"{i}.png")
    return root


@pytest.mark.slow
def test_head_reset_for_seven_classes_records_the_source(tmp_path, capsys):
    """A 10-class source into a 7-class task: timm drops the head (fresh 7-class head), the body and the features
    are the source's; the run records the source and its sha256 in results.json and in the weights' metadata."""
    src = _perturbed("vit_digits_patch2_8_res", seed=0)
    path = tmp_path / "res10.safetensors"
    save_file(src.state_dict(), str(path))
    source = resolve_pretrained(str(path))
    assert (source.num_classes, source.in_chans) == (10, 1)
    model = create_pretrained("vit_digits_patch2_8_dhc2", source, dict(SMALL, num_classes=7)).eval()
    assert model.head.weight.shape == (7, 32) and not torch.equal(model.head.weight, src.head.weight[:7])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(feats, src.forward_head(src.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)

    data = _digit_folder(tmp_path / "seven", classes=7)
    out = tmp_path / "run"
    args = ["model=vit_digits_patch2_8_dhc2", f"pretrained={path}", f"data_dir={data}", "global_batch_size=8"]
    assert train_cls.main(args + SMALL_ARGS + [f"output_dir={out}", "epochs=1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["pretrained"] == {"source": str(path), "kind": "file", "file": str(path),
                                 "sha256": hcvision.io.file_sha256(path)}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("head.weight").shape == (7, 32)
    assert meta["pretrained"] == str(path) and meta["pretrained_sha256"] == source.sha256


def test_timm_train_py_checkpoint_gives_its_ema_weights(tmp_path):
    """A timm train.py checkpoint (.pth.tar with state_dict, state_dict_ema and the argparse namespace) loads
    safely, with the EMA weights first as timm's loader does."""
    raw, ema = _perturbed("vit_digits_patch2_8_res", seed=1), _perturbed("vit_digits_patch2_8_res", seed=2)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_digits_patch2_8_res", "state_dict": raw.state_dict(),
                "state_dict_ema": ema.state_dict(), "args": argparse.Namespace(model="x", lr=0.1)}, path)
    model = create_pretrained("vit_digits_patch2_8_shc2", resolve_pretrained(str(path)), SMALL)
    a, b = _val_logits(model), _val_logits(ema)
    assert torch.equal(a.argmax(1), b.argmax(1)) and not torch.equal(b.argmax(1), _val_logits(raw).argmax(1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_local_dir_export_round_trips(tmp_path):
    """``local-dir:DIR`` written by hcvision.models.save_pretrained (timm's save_for_hf layout): the connections
    of a trained HC model come from the export, so the loaded model is the exported one, bit for bit."""
    src = _perturbed("vit_digits_patch2_8_dhc2", seed=3)
    out = hcvision.models.save_pretrained(src, tmp_path / "export")
    source = resolve_pretrained(f"local-dir:{out}")
    assert source.kind == "local-dir" and source.file.name == "model.safetensors"
    model = create_pretrained("vit_digits_patch2_8_dhc2", source, SMALL)
    torch.testing.assert_close(_val_logits(model), _val_logits(src), rtol=0, atol=0)


@pytest.mark.parametrize("spec, message", [
    ("hf-hub:timm/vit_small_patch16_224.augreg_in21k", r"HF_HUB_OFFLINE.*local-dir:DIR"),
    ("vit_small_patch16_224.augreg_in21k", r"HF_HUB_OFFLINE.*local-dir:DIR"),
    ("vit_small_patch16_224.no_such_tag", r"timm has no such tag; tags of this model: vit_small_patch16_224\."),
    ("missing/weights.safetensors", r"does not exist; accepted: a local file"),
    ("local-dir:/nonexistent/dir", r"is not a directory"),
])
def test_unavailable_sources_exit_2_before_writing(tmp_path, monkeypatch, capsys, spec, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # an empty local cache
    out = tmp_path / "run"
    assert train_cls.main(["model=vit_digits_patch2_8_dhc2", f"pretrained={spec}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_cls.py: error: pretrained=")
    import re

    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_wrong_size_source_names_the_tensors(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("vit_digits_patch2_8_res", embed_dim=48, depth=1).state_dict(), str(path))
    out = tmp_path / "run"
    assert train_cls.main(["model=vit_digits_patch2_8_dhc2", f"pretrained={path}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit model='vit_digits_patch2_8_dhc2'" in err and ("cls_token" in err or "pos_embed" in err)
    assert not out.exists()


def test_eval_only_takes_one_start_point(capsys):
    assert train_cls.main(["eval_only=true"]) == 2
    assert train_cls.main(["eval_only=true", f"pretrained={RES_WEIGHTS}", f"checkpoint={RES_WEIGHTS}"]) == 2
    assert "checkpoint=PATH" in capsys.readouterr().err
