"""Tests for hcvision.eval: generative metrics, inputs, safe offline weights, the digits extractor, the CLI.

No network and no real Inception weights: a random InceptionV3 in torch-fidelity's layout is built here with a
variance-preserving (Kaiming) init so its features differ between image sets. Metrics are checked against
torch-fidelity's own ``calculate_metrics`` and against independent numpy/scipy computations on the same features.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.distance import cdist

from hcvision.eval import (
    DIGITS_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS_ENV,
    FeatureStats,
    MetricOptions,
    WeightsUnavailableError,
    cls_acc,
    compute_stats,
    digits_preprocess,
    digits_to_uint8,
    generative_metrics,
    load_image_folder,
    load_inception_state_dict,
    load_npz_samples,
    load_stats,
    metrics_from_stats,
    save_digits_classifier,
    save_npz_samples,
    save_reference_stats,
    save_stats,
)
from hcvision.eval.features import INCEPTION_URL, inception_reference_shapes, validate_inception_state_dict
from hcvision.eval.generative import main
from hcvision.eval.metrics import UInt8ImageDataset

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 12  # InceptionV3 at 299 px costs ~0.25 s per image on 2 idle CPU cores


# ------------------------------------------------------------------------------------------------ independent math


def fid_numpy(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID from raw features with numpy + scipy.linalg.sqrtm, independent of torch-fidelity.

    With fewer samples than dimensions the covariances are singular, so tr sqrt(S1 S2) is taken on the small
    Gram form: S_i = X_i^T X_i (centred, scaled by 1/sqrt(n-1)), and S1 S2 has the same non-zero spectrum as
    (X2 X1^T)(X2 X1^T)^T, a PSD n2 x n2 matrix whose sqrtm is well defined.
    """
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    x1 = (f1 - mu1) / np.sqrt(len(f1) - 1)
    x2 = (f2 - mu2) / np.sqrt(len(f2) - 1)
    g = x2 @ x1.T
    tr_sqrt = np.trace(scipy.linalg.sqrtm(g @ g.T)).real
    # Second route to the same number: the nuclear norm of g.
    assert tr_sqrt == pytest.approx(scipy.linalg.svdvals(g).sum(), rel=1e-6)
    return float(((mu1 - mu2) ** 2).sum() + (x1**2).sum() + (x2**2).sum() - 2 * tr_sqrt)


def prc_numpy(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN precision/recall (Kynkäänniemi et al., ADM evaluator) by brute force."""
    gen, ref = gen.astype(np.float64), ref.astype(np.float64)
    r_ref = np.sort(cdist(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    r_gen = np.sort(cdist(gen, gen), axis=1)[:, k]
    d = cdist(gen, ref)
    precision = (d <= r_ref[None, :]).any(axis=1).mean()
    recall = (d.T <= r_gen[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def inception_score_numpy(logits: np.ndarray) -> float:
    """IS with one split: exp(E_x KL(p(y|x) || p(y)))."""
    z = logits.astype(np.float64)
    logp = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(logp)
    logpy = np.log(p.mean(axis=0))
    return float(np.exp((p * (logp - logpy)).sum(axis=1).mean()))


# ------------------------------------------------------------------------------------------------ fixtures


def smooth_images(seed: int, n: int, gamma: float) -> np.ndarray:
    """Smooth random colour fields (uint8 NHWC 32x32); gamma shifts the distribution between sets."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) ** gamma
    x = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A random InceptionV3 in torch-fidelity's layout with Kaiming-normal convolutions, as safetensors."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            # Default init shrinks activations layer by layer and all features end up equal (then FID ~ 0).
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    # Large classifier weights so per-image logits differ and the Inception Score is clearly above 1.
    torch.nn.init.normal_(net.fc.weight, std=3.0)
    path = tmp_path_factory.mktemp("inception") / "inception_random.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("images")
    gen, ref = smooth_images(1, N_IMAGES, 1.0), smooth_images(2, N_IMAGES, 2.5)
    out = {"gen": gen, "ref": ref}
    for name, arr in (("gen", gen), ("ref", ref)):
        folder = root / f"{name}_png"
        folder.mkdir()
        for i, img in enumerate(arr):
            Image.fromarray(img).save(folder / f"{i:04d}.png")
        out[f"{name}_dir"] = folder
        out[f"{name}_npz"] = save_npz_samples(root / f"{name}.npz", arr)
    return out


@pytest.fixture
def one_thread():
    """Tiny digits models: one intra-op thread (OpenMP threads spin-wait badly on a shared, busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_env_weights(monkeypatch):
    for var in ("HCV_INCEPTION_WEIGHTS", "HCV_DIGITS_CLASSIFIER", "HCV_DIGITS_MODEL_NAME"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------------------ inputs and files


def test_npz_roundtrip_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = save_npz_samples(tmp_path / "s.npz", images, labels)
    with np.load(path, allow_pickle=False) as raw:  # ADM layout: arr_0 uint8 NHWC, arr_1 labels
        assert sorted(raw.files) == ["arr_0", "arr_1"] and raw["arr_0"].dtype == np.uint8
    back, back_labels = load_npz_samples(path)
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_labels, labels)
    # Grayscale NHW is stored as NHW1; PNG folders read back bit-exactly as RGB.
    gray, _ = load_npz_samples(save_npz_samples(tmp_path / "g.npz", images[..., 0]))
    np.testing.assert_array_equal(gray[..., 0], images[..., 0])
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    np.testing.assert_array_equal(load_image_folder(folder), images)
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        save_npz_samples(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 5\)"):
        save_npz_samples(tmp_path / "x.npz", np.zeros((2, 4, 4, 5), np.uint8))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        load_npz_samples(tmp_path / "other.npz")
    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="vgg16"):
        generative_metrics(imgs, imgs, feature_extractor="vgg16")
    with pytest.raises(ValueError, match="neither an image folder nor an .npz"):
        generative_metrics(tmp_path / "missing.png", imgs)
    with pytest.raises(ValueError, match="ref is required"):
        generative_metrics(imgs, None)
    with pytest.raises(ValueError, match="'tpu'"):
        generative_metrics(imgs, imgs, device="tpu")
    with pytest.raises(ValueError, match="batch_size"):
        generative_metrics(imgs, imgs, batch_size=0)


def test_stats_file_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(6, 4)).astype(np.float32)
    stats = FeatureStats(mu=feats.mean(0).astype(np.float64), sigma=np.cov(feats, rowvar=False),
                         feature_extractor=INCEPTION_EXTRACTOR, weights_sha256="ab" * 32, num_samples=6,
                         features=feats)
    back = load_stats(save_stats(tmp_path / "st.npz", stats))
    np.testing.assert_array_equal(back.features, feats)
    np.testing.assert_allclose(back.sigma, stats.sigma)
    assert (back.feature_extractor, back.weights_sha256, back.num_samples, back.logits) == (
        INCEPTION_EXTRACTOR, "ab" * 32, 6, None)
    # Statistics of one set against themselves: FID 0, precision = recall = 1.
    m = metrics_from_stats(back, back, ["fid", "prc"])
    assert abs(m["fid"]) < 1e-9 and m["precision"] == 1.0 and m["recall"] == 1.0
    with pytest.raises(ValueError, match="per-sample features"):
        metrics_from_stats(back, FeatureStats(back.mu, back.sigma, INCEPTION_EXTRACTOR, "", 6), ["fid", "prc"])


# ---------------------------------------------------------------------------------------------- weights: safe, offline


def test_offline_without_weights_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))

    def no_network(*args, **kwargs):
        raise URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(WeightsUnavailableError) as err:
        generative_metrics(imgs, imgs)
    msg = str(err.value)
    for needle in ("weights_path", "--inception-weights", INCEPTION_WEIGHTS_ENV, INCEPTION_URL, "unreachable"):
        assert needle in msg
    # A configured path that does not exist is reported by name.
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsUnavailableError, match="nope.pth"):
        load_inception_state_dict()


class _Evil:
    """Unpickling this would create a file: proves no pickle code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_corrupt_foreign_and_malicious_weights_rejected(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": _Evil(str(marker))}, evil)
    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="safely"):
        generative_metrics(imgs, imgs, weights_path=evil)
    assert not marker.exists(), "a pickle payload was executed"

    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="junk.pth"):
        load_inception_state_dict(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_inception_state_dict(junk_st)

    foreign = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, str(foreign))
    with pytest.raises(ValueError, match=r"missing keys.*unexpected keys.*shape mismatches"):
        load_inception_state_dict(foreign)

    shapes = inception_reference_shapes()
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    validate_inception_state_dict(state)  # the complete layout passes
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    with pytest.raises(ValueError, match=r"Mixed_7c.branch_pool.conv.weight: \(192, 2048, 3, 3\)"):
        validate_inception_state_dict(state)


# ------------------------------------------------------------------------------------------------ Inception metrics


@pytest.mark.slow
def test_inception_metrics_match_torch_fidelity_and_numpy(inception_weights, image_sets, tmp_path, monkeypatch):
    import torch_fidelity

    w = inception_weights
    # Features once per set: gen from a PNG folder, ref from an ADM .npz.
    gen = compute_stats(image_sets["gen_dir"], weights_path=w, include_logits=True, device="cpu")
    ref = compute_stats(image_sets["ref_npz"], weights_path=w, device="cpu")
    assert gen.features.shape == ref.features.shape == (N_IMAGES, 2048)  # Inception pool, not VGG16 (4096)
    res = metrics_from_stats(gen, ref, ["fid", "isc", "prc", "kid"])
    assert set(res) == {"fid", "is_mean", "is_std", "precision", "recall", "kid_mean", "kid_std"}

    # 1) torch-fidelity end to end with the same (safely loaded) network and explicit extractor for all metrics.
    tf = torch_fidelity.calculate_metrics(
        input1=str(image_sets["gen_dir"]), input2=UInt8ImageDataset(image_sets["ref"]), cuda=False,
        fid=True, isc=True, prc=True, feature_extractor=INCEPTION_EXTRACTOR,
        feature_extractor_weights_path=str(w), cache=False, verbose=False, save_cpu_ram=True)
    assert res["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-3)
    assert res["is_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-5)
    assert (res["precision"], res["recall"]) == (tf["precision"], tf["recall"])

    # 2) independent numpy/scipy computations on the same features.
    fid_ref = fid_numpy(gen.features, ref.features)
    assert fid_ref > 1e-3 * np.trace(ref.sigma), "features too uninformative for a meaningful test"
    assert res["fid"] == pytest.approx(fid_ref, rel=1e-3)
    assert (res["precision"], res["recall"]) == pytest.approx(prc_numpy(gen.features, ref.features, k=3))
    one_split = metrics_from_stats(gen, ref, ["isc"], MetricOptions(isc_splits=1))
    assert one_split["is_mean"] == pytest.approx(inception_score_numpy(gen.logits), rel=1e-6)

    # 3) gen from an .npz (not the folder) + cached reference statistics give the same numbers.
    stats_path = save_stats(tmp_path / "ref_stats.npz", ref)
    cached = generative_metrics(image_sets["gen_npz"], stats_path, weights_path=w, kid=True, device="cpu")
    for key in res:
        assert cached[key] == pytest.approx(res[key], rel=1e-4, abs=1e-7), key
    self_m = metrics_from_stats(ref, load_stats(stats_path), ["fid", "prc"])
    assert abs(self_m["fid"]) < 1e-4 * np.trace(ref.sigma)  # eigvals of a singular product: ~1e-6 noise
    assert self_m["precision"] == 1.0 and self_m["recall"] == 1.0

    # 4) the CLI (weights via the environment variable) writes results.json; inputs are statistics files here
    #    (the image path of the CLI is exercised with the digits extractor), so no extra Inception passes.
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(w))
    gen_stats_path = save_stats(tmp_path / "gen_stats.npz", gen)
    out = tmp_path / "results.json"
    assert main(["--gen", str(gen_stats_path), "--ref", str(stats_path), "--kid", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == pytest.approx(res)

    # Statistics from other weights are refused rather than silently compared.
    other = load_stats(stats_path)
    other.weights_sha256 = "0" * 64
    with pytest.raises(ValueError, match="different"):
        generative_metrics(image_sets["gen_npz"], other, weights_path=w, isc=False, device="cpu")


# ------------------------------------------------------------------------------------------------ digits extractor

# A depth-1 twin of the hcvision digits classifier (its cfg normalises with mean 0.3, std 0.375).
DIGITS_MODEL = "vit_digits_patch2_8_res"
TINY = dict(embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    import timm

    import hcvision.models  # noqa: F401  (registers the hcvision models with timm)

    torch.manual_seed(0)
    model = timm.create_model(DIGITS_MODEL, **TINY).eval()
    path = tmp_path_factory.mktemp("digits") / "clf.safetensors"
    save_digits_classifier(model, path, DIGITS_MODEL, TINY)
    return model, path


@pytest.fixture(scope="module")
def digits_uint8():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, digits_to_uint8(torch.from_numpy(d.images)).numpy(), d.target


def test_digits_preprocess_convention(one_thread, digits_uint8):
    values, u8, _ = digits_uint8
    x = torch.from_numpy(u8[:50])[:, None]
    pre = digits_preprocess(x)
    assert pre.shape == (50, 1, 8, 8)
    # uint8 round trip is within half a uint8 step of sklearn's 0..16 scale.
    assert np.abs(pre[:, 0].numpy() - values[:50]).max() <= 16 / 255 / 2 + 1e-6
    # Nearest-enlarged RGB copies map to the same classifier input.
    big_rgb = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).expand(-1, 3, -1, -1)
    torch.testing.assert_close(digits_preprocess(big_rgb), pre)
    with pytest.raises(ValueError, match="uint8"):
        digits_preprocess(x.float())


def test_digits_input_matches_training_pipeline(one_thread, digits_classifier):
    """The extractor feeds the classifier what train_cls.py trained it on (DigitsDataset + the model's cfg)."""
    from hcvision.data.digits import DigitsDataset
    from hcvision.eval import DigitsFeatureExtractor

    model, clf = digits_classifier
    cfg = model.pretrained_cfg
    ds = DigitsDataset("val", cfg["mean"], cfg["std"])
    ext = DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["logits"], feature_extractor_weights_path=str(clf))
    # The same digits as uint8 (sklearn 0..16 -> round(v * 255 / 16)).
    u8 = digits_to_uint8((ds.images * cfg["std"][0] + cfg["mean"][0]) * 16)
    model_in = (digits_preprocess(u8) / 16 - ext.mean) / ext.std
    assert (ext.mean, ext.std) == (0.3, 0.375)
    assert (model_in - ds.images).abs().max() <= 0.5 / 255 / 0.375 + 1e-5  # uint8 rounding only
    with torch.no_grad():
        torch.testing.assert_close(ext(u8)[0], model(model_in), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # mostly the CLI subprocess start-up (torch, timm, torch-fidelity imports)
def test_digits_metrics_cls_acc_and_cli(one_thread, digits_classifier, digits_uint8, tmp_path):
    model, clf = digits_classifier
    _, u8, _ = digits_uint8
    ref_imgs, gen_imgs = u8[:300], u8[300:600]

    # Independent features: the model applied directly to (x / 255 - 0.3) / 0.375 (its cfg normalisation).
    def feats(imgs):
        with torch.no_grad():
            t = model.forward_features((torch.from_numpy(imgs).float()[:, None] / 255 - 0.3) / 0.375)
            return model.forward_head(t, pre_logits=True).numpy(), model.forward_head(t).numpy()

    (f_gen, l_gen), (f_ref, _) = feats(gen_imgs), feats(ref_imgs)
    labels = l_gen.argmax(1).copy()
    labels[::4] = (labels[::4] + 1) % 10  # a quarter deliberately wrong
    gen_npz = save_npz_samples(tmp_path / "gen.npz", gen_imgs, labels)

    m = generative_metrics(gen_npz, ref_imgs, feature_extractor=DIGITS_EXTRACTOR, weights_path=clf, kid=True,
                           device="cpu")
    # FID the usual way (32 features < 300 samples: full-rank covariances, sqrtm of S1 S2 directly).
    mu1, mu2 = f_gen.mean(0), f_ref.mean(0)
    s1, s2 = np.cov(f_gen.astype(np.float64), rowvar=False), np.cov(f_ref.astype(np.float64), rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert m["fid"] == pytest.approx(fid, rel=1e-3)
    assert (m["precision"], m["recall"]) == pytest.approx(prc_numpy(f_gen, f_ref, k=3))
    assert m["cls_acc"] == pytest.approx(np.mean(l_gen.argmax(1) == labels)) and m["cls_acc"] == 0.75
    assert cls_acc(gen_imgs, labels, weights_path=clf, device="cpu") == 0.75
    # Cached reference statistics reproduce the raw-reference numbers.
    ref_stats = save_reference_stats(ref_imgs, tmp_path / "digits_ref.npz", feature_extractor=DIGITS_EXTRACTOR,
                                     weights_path=clf, device="cpu")
    np.testing.assert_allclose(ref_stats.features, f_ref, rtol=1e-4, atol=1e-5)
    m2 = generative_metrics(gen_npz, tmp_path / "digits_ref.npz", feature_extractor=DIGITS_EXTRACTOR,
                            weights_path=clf, kid=True, device="cpu")
    assert m2 == pytest.approx(m)

    # CLI as a module, digits classifier from the environment variable: reference statistics are written from a
    # PNG folder, then gen (an .npz of the same images, with labels) is compared with them.
    ref_dir = tmp_path / "ref_png"
    ref_dir.mkdir()
    for i, img in enumerate(gen_imgs):
        Image.fromarray(img).save(ref_dir / f"{i:04d}.png")
    out, stats_path = tmp_path / "results.json", tmp_path / "ref_stats.npz"
    prov = tmp_path / "sample_config.json"  # what a sampler recorded; --sampling-steps overrides its 250
    prov.write_text(json.dumps({"objective": "ddpm", "sampler": "ddpm", "sampling_steps": 250, "guidance_scale": 1.5,
                                "guidance_channels": 1, "seed": 3}))
    env = {**os.environ, "HCV_DIGITS_CLASSIFIER": str(clf), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hcvision.eval.generative", "--gen", str(gen_npz), "--ref", str(ref_dir),
         "--write-ref-stats", str(stats_path), "--feature-extractor", DIGITS_EXTRACTOR, "--device", "cpu",
         "--out", str(out), "--provenance", str(prov), "--sampling-steps", "100", "--guidance-interval", "0", "0.5",
         "--ema"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(out.read_text())
    assert written["feature_extractor"] == DIGITS_EXTRACTOR and written["ref_stats_written"] == str(stats_path)
    # Provenance: sample counts, the reference's name and sha256 (of its sorted files), the extractor's weights.
    from hcvision.eval import input_sha256
    from hcvision.io import file_sha256

    assert (written["num_samples"], written["num_ref_samples"]) == (300, 300)
    assert written["reference"] == "ref_png" and written["reference_sha256"] == input_sha256(ref_dir)
    assert written["extractors"] == {DIGITS_EXTRACTOR: {"weights_sha256": file_sha256(clf)}}
    assert {k: written.get(k) for k in ("objective", "sampler", "sampling_steps", "guidance_scale",
                                        "guidance_interval", "guidance_channels", "ema", "seed")} == {
        "objective": "ddpm", "sampler": "ddpm", "sampling_steps": 100, "guidance_scale": 1.5,
        "guidance_interval": [0.0, 0.5], "guidance_channels": 1, "ema": True, "seed": None}
    np.testing.assert_allclose(load_stats(stats_path).features, f_gen, rtol=1e-4, atol=1e-5)
    # The same images against themselves: FID ~ 0, precision = recall = 1.
    assert written["metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert written["metrics"]["precision"] == written["metrics"]["recall"] == 1.0
    assert written["metrics"]["cls_acc"] == 0.75


def test_digits_classifier_errors(one_thread, digits_classifier, tmp_path):
    from safetensors.torch import save_file

    _, clf = digits_classifier
    imgs = np.zeros((10, 8, 8), np.uint8)
    with pytest.raises(WeightsUnavailableError, match="HCV_DIGITS_CLASSIFIER"):
        generative_metrics(imgs, imgs, feature_extractor=DIGITS_EXTRACTOR, weights_path=tmp_path / "none.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(ValueError, match="model_name"):
        generative_metrics(imgs, imgs, feature_extractor=DIGITS_EXTRACTOR, weights_path=bare)
    with pytest.raises(ValueError, match="does not fit 'vit_digits_patch2_8_res'"):
        generative_metrics(imgs, imgs, feature_extractor=DIGITS_EXTRACTOR, weights_path=bare,
                           model_name=DIGITS_MODEL)
    with pytest.raises(ValueError, match="holds weights of 'vit_digits_patch2_8_res', not 'no_such_model'"):
        generative_metrics(imgs, imgs, feature_extractor=DIGITS_EXTRACTOR, weights_path=clf, model_name="no_such_model")


def test_committed_digits_classifiers_reproduce_recorded_top1(one_thread):
    """The repository's digits classifiers, loaded by the extractor, reach the top-1 train_cls.py recorded in
    weights/index.json on the training pipeline's own inputs; through the uint8 evaluation path (what generated
    samples go through) at most one of the 360 held-out predictions may flip, from rounding to 8 bits."""
    from hcvision.data.digits import DigitsDataset
    from hcvision.eval import DigitsFeatureExtractor

    index = json.loads((REPO / "weights" / "index.json").read_text())
    entries = {k: v for k, v in index.items() if k.endswith(".hcv_digits")}
    assert entries, "weights/index.json lists no digits classifier"
    for name, entry in entries.items():
        path = REPO / "weights" / entry["file"]
        ext = DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["logits"], feature_extractor_weights_path=str(path))
        ds = DigitsDataset("val", (ext.mean,), (ext.std,))
        with torch.no_grad():
            pred_float = ext.model(ds.images).argmax(1)
        assert (pred_float == ds.targets).double().mean().item() * 100 == pytest.approx(entry["top1"], abs=1e-3)
        u8 = digits_to_uint8((ds.images * ext.std + ext.mean) * 16)
        pred_u8 = ext.classify(u8).argmax(1)
        assert (pred_u8 != pred_float).sum() <= 1, name
        acc = cls_acc(u8.permute(0, 2, 3, 1).numpy(), ds.targets.numpy(), weights_path=path, device="cpu")
        assert acc == (pred_u8 == ds.targets).double().mean().item()


# ------------------------------------------------------------------------------------------------ top-k accumulation


def test_topk_accumulator_add_hits_matches_update_on_the_valid_samples():
    """What a distributed evaluation feeds it: per-sample hits gathered across ranks plus a validity mask (unreadable
    images come with target -1). The count must equal update() on the valid samples alone."""
    from hcvision.eval import TopKAccumulator, topk_hits

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(20, 7, generator=g), torch.randint(0, 7, (20,), generator=g)
    valid = torch.ones(20, dtype=torch.bool)
    valid[[2, 5, 11]] = False
    targets[~valid] = -1
    gathered = TopKAccumulator((1, 3))
    for sl in (slice(0, 8), slice(8, 20)):  # two "ranks"
        gathered.add_hits(topk_hits(logits[sl], targets[sl], (1, 3)), valid[sl])
    direct = TopKAccumulator((1, 3))
    direct.update(logits[valid], targets[valid])
    assert gathered.compute() == direct.compute() and gathered.count == 17
    expect = [(logits[valid].topk(k, 1).indices == targets[valid, None]).any(1).sum().item() for k in (1, 3)]
    assert gathered.correct.tolist() == expect
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        gathered.add_hits(torch.zeros(4, 3, dtype=torch.bool))
