"""sFID, FD-DINOv2 and provenance: each metric equals an independent computation on the same features.

sFID's features are checked against a forward hook on torch-fidelity's own InceptionV3 at ``Mixed_6d.branch1x1`` (TF's
``mixed_6/conv``), then the distance against numpy/scipy. FD-DINOv2's features are checked against dgm-eval's
preprocessing done with torchvision on PIL images and a DINOv2 whose position embedding the test resamples itself.
Weights are random stand-ins built here: a Kaiming InceptionV3 and a depth-1 ``vit_small_patch14_dinov2``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval_generative import fid_numpy, inception_weights, smooth_images  # noqa: F401  (fixture reused)

from hcvision.cli import UsageError
from hcvision.eval import (
    DINOV2_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    SPATIAL_FEATURE,
    FeatureStats,
    SafeInceptionV3,
    compute_stats,
    evaluate_generative,
    generative_metrics,
    load_stats,
    metrics_from_stats,
    provenance_fields,
    save_reference_stats,
    save_stats,
)
from hcvision.io import file_sha256

N = 8  # images per set: InceptionV3 at 299 px costs ~0.25 s per image on 2 idle cores
DINO = "vit_small_patch14_dinov2"
DINO_KWARGS = {"depth": 1}


def _dinov2_file(path, seed: int):
    """A random depth-1 DINOv2 ViT-S/14 at its native 518 px (37x37 position grid), layer scale 1 so the block
    mixes patch tokens into the CLS token (at DINOv2's init 1e-5 every image would give nearly the same feature)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(DINO, **DINO_KWARGS)
    state = {k: (torch.ones_like(v) if k.endswith(".gamma") else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": DINO, "model_kwargs": json.dumps(DINO_KWARGS)})
    return path


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    return _dinov2_file(root / "dinov2_a.safetensors", 0), _dinov2_file(root / "dinov2_b.safetensors", 1)


@pytest.fixture(scope="module")
def sets():
    return smooth_images(1, N, 1.0), smooth_images(2, N, 2.5)


@pytest.fixture(scope="module")
def stats(inception_weights, dinov2_weights, sets):  # noqa: F811
    """gen and ref statistics with every feature set, computed once."""
    kw = dict(weights_path=inception_weights, sfid=True, fd_dinov2=True, dinov2_weights=dinov2_weights[0],
              include_logits=True, device="cpu")
    return compute_stats(sets[0], **kw), compute_stats(sets[1], **kw)


def _dinov2_independent(images: np.ndarray, weights) -> np.ndarray:
    """dgm-eval's transform (torchvision Resize((224, 224), BICUBIC) on PIL, ToTensor, ImageNet Normalize) and a
    DINOv2 built at 224 px whose 37x37 position embedding is resampled here (bicubic, no antialias)."""
    import timm
    import torchvision.transforms as T
    from PIL import Image
    from safetensors.torch import load_file

    tf = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.fromarray(img)) for img in images])
    state = load_file(str(weights))
    pos = state["pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    model = timm.create_model(DINO, img_size=224, num_classes=0, **DINO_KWARGS).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x).numpy()


def _fd_numpy_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance from moments with scipy's sqrtm (full rank here: more samples than dimensions)."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    return float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * covmean))


@pytest.mark.slow  # ~5 InceptionV3 passes over 8 images
def test_sfid_matches_adm_definition_and_scipy(inception_weights, sets, stats):  # noqa: F811
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from hcvision.eval import load_inception_state_dict

    gen, ref = stats
    assert gen.spatial.mu.shape == (17 * 17 * 7,) and gen.spatial.feature_extractor.endswith(SPATIAL_FEATURE)
    # Features: hcvision's extractor vs a hook on torch-fidelity's own network at Mixed_6d.branch1x1, NHWC[..., :7].
    ext = SafeInceptionV3(INCEPTION_EXTRACTOR, ["2048", SPATIAL_FEATURE],
                          feature_extractor_weights_path=inception_weights)
    state, _, _ = load_inception_state_dict(inception_weights)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    plain = FeatureExtractorInceptionV3("plain", ["2048"], feature_extractor_weights_path=buf)
    seen = []
    plain.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o.permute(0, 2, 3, 1)[..., :7]))
    feats = {}
    for name, imgs in (("gen", sets[0]), ("ref", sets[1])):
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            pool, spatial = ext(x)
            plain(x)
        torch.testing.assert_close(spatial, seen[-1].reshape(len(x), -1), rtol=0, atol=0)
        torch.testing.assert_close(pool, plain(x)[0], rtol=0, atol=0)  # FID's features untouched by the hook
        feats[name] = spatial.numpy()
    m = metrics_from_stats(gen, ref, ["fid", "sfid"])
    # Independent distance on the same features (2023 dims > 8 samples: the Gram form of fid_numpy).
    expected = fid_numpy(feats["gen"], feats["ref"])
    assert expected > 1e-3 * np.trace(ref.spatial.sigma), "features too uninformative for a meaningful test"
    assert m["sfid"] == pytest.approx(expected, rel=1e-3)
    assert m["sfid"] != pytest.approx(m["fid"], rel=1e-2)  # another feature set, not FID under another name
    self_m = metrics_from_stats(gen, gen, ["sfid"])
    assert abs(self_m["sfid"]) < 1e-4 * np.trace(gen.spatial.sigma)


@pytest.mark.slow
def test_fd_dinov2_matches_dgm_eval_preprocessing_and_scipy(dinov2_weights, sets, stats):
    gen, ref = stats
    f_gen = _dinov2_independent(sets[0], dinov2_weights[0])
    f_ref = _dinov2_independent(sets[1], dinov2_weights[0])
    assert gen.dinov2.mu.shape == (384,) and gen.dinov2.weights_sha256 == file_sha256(dinov2_weights[0])
    np.testing.assert_allclose(gen.dinov2.mu, f_gen.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gen.dinov2.sigma, np.cov(f_gen.astype(np.float64), rowvar=False), rtol=1e-3,
                               atol=1e-6)
    m = metrics_from_stats(gen, ref, ["fd_dinov2"])
    expected = fid_numpy(f_gen, f_ref)  # 384 dims > 8 samples
    assert expected > 1e-3 * np.trace(ref.dinov2.sigma), "features too uninformative for a meaningful test"
    assert m["fd_dinov2"] == pytest.approx(expected, rel=1e-3)
    assert abs(metrics_from_stats(ref, ref, ["fd_dinov2"])["fd_dinov2"]) < \
        1e-4 * np.trace(ref.dinov2.sigma)


def test_frechet_distance_equals_scipy_on_full_rank_moments():
    """The shared distance (FID, sFID, FD-DINOv2) against scipy's sqrtm where the covariances are full rank."""
    rng = np.random.default_rng(0)
    a_f, b_f = rng.normal(size=(200, 6)), rng.normal(loc=0.3, scale=1.5, size=(150, 6))
    mk = lambda f: FeatureStats(f.mean(0), np.cov(f, rowvar=False), "x", "", len(f))  # noqa: E731
    from hcvision.eval import frechet_distance

    a, b = mk(a_f), mk(b_f)
    assert frechet_distance(a, b) == pytest.approx(_fd_numpy_from_stats(a, b), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9


@pytest.mark.slow
def test_reference_stats_cache_every_feature_set_and_refuse_other_weights(
        inception_weights, dinov2_weights, sets, stats, tmp_path):  # noqa: F811  (the fixture imported above)
    gen, ref = stats
    kw = dict(weights_path=inception_weights, dinov2_weights=dinov2_weights[0], device="cpu")
    path = save_stats(tmp_path / "ref.npz", ref)
    back = load_stats(path)
    for name in ("spatial", "dinov2"):
        aux, orig = getattr(back, name), getattr(ref, name)
        np.testing.assert_array_equal(aux.mu, orig.mu)
        np.testing.assert_array_equal(aux.sigma, orig.sigma)
        assert (aux.feature_extractor, aux.weights_sha256, aux.num_samples) == (
            orig.feature_extractor, orig.weights_sha256, N)
    assert back.spatial.weights_sha256 == file_sha256(inception_weights)
    # Cached reference = raw reference, for every metric.
    full = metrics_from_stats(gen, ref, ["fid", "prc", "sfid", "fd_dinov2"])
    res = evaluate_generative(sets[0], path, metrics=["fid", "prc", "sfid", "fd_dinov2"], **kw)
    assert res.metrics == pytest.approx(full, rel=1e-5, abs=1e-8)
    assert (res.num_samples, res.num_ref_samples) == (N, N)
    assert res.extractors == {INCEPTION_EXTRACTOR: file_sha256(inception_weights),
                              DINOV2_EXTRACTOR: file_sha256(dinov2_weights[0])}
    # Statistics made with other DINOv2 weights (or with doctored fingerprints) are refused before any feature.
    with pytest.raises(UsageError, match="different hcv-dinov2 weights"):
        generative_metrics(sets[0], path, fid=False, isc=False, prc=False, fd_dinov2=True,
                           **{**kw, "dinov2_weights": dinov2_weights[1]})
    doctored = load_stats(path)
    doctored.spatial.weights_sha256 = "0" * 64
    with pytest.raises(UsageError, match=r"\(sFID\).*different hcv-inception-v3-compat weights"):
        generative_metrics(sets[0], doctored, fid=False, isc=False, prc=False, sfid=True, **kw)
    # A cache without the requested feature set says how to make one.
    plain = save_stats(tmp_path / "plain.npz", FeatureStats(ref.mu, ref.sigma, ref.feature_extractor,
                                                            ref.weights_sha256, N, ref.features))
    with pytest.raises(UsageError, match="no sFID statistics.*--write-ref-stats"):
        generative_metrics(sets[0], plain, isc=False, sfid=True, **kw)
    # save_reference_stats writes every feature set it is asked for.
    written = save_reference_stats(sets[1], tmp_path / "ref2.npz", sfid=True, fd_dinov2=True, **kw)
    again = load_stats(tmp_path / "ref2.npz")
    np.testing.assert_allclose(again.spatial.mu, ref.spatial.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.dinov2.mu, written.dinov2.mu)


def test_sfid_and_fd_dinov2_options_are_checked(tmp_path, monkeypatch):
    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    monkeypatch.delenv("HCV_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(UsageError, match="sFID is defined on Inception"):
        generative_metrics(imgs, imgs, feature_extractor="hcv-digits", sfid=True)
    with pytest.raises(UsageError, match="--dinov2-weights PATH.*HCV_DINOV2_WEIGHTS"):
        generative_metrics(imgs, imgs, fid=False, isc=False, prc=False, fd_dinov2=True)
    bad = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file({"cls_token": torch.full((1, 1, 4), float("nan"))}, str(bad))
    with pytest.raises(UsageError, match="NaN or Inf values in cls_token"):
        generative_metrics(imgs, imgs, fid=False, isc=False, prc=False, fd_dinov2=True, dinov2_weights=bad)
    with pytest.raises(UsageError, match="FD-DINOv2 needs at least 2 samples"):
        generative_metrics(imgs[:1], imgs, fid=False, isc=False, prc=False, fd_dinov2=True, dinov2_weights=bad)


def test_provenance_fields():
    sampling = dict(sampler="ddpm", sampling_steps=250, guidance_scale=1.5, guidance_interval=(0, 0.7),
                    guidance_channels=3, diffusion_norm=1)
    out = provenance_fields(num_samples=50000, objective="ddpm", sampling=sampling, ema=True, reference="VIRTUAL.npz",
                            reference_sha256="a" * 64, extractors={"hcv-inception-v3-compat": "b" * 64})
    assert out == {"num_samples": 50000, "objective": "ddpm", "sampler": "ddpm", "sampling_steps": 250,
                   "guidance_scale": 1.5, "guidance_interval": [0.0, 0.7], "guidance_channels": 3,
                   "diffusion_norm": 1.0, "ema": True, "reference": "VIRTUAL.npz", "reference_sha256": "a" * 64,
                   "extractors": {"hcv-inception-v3-compat": {"weights_sha256": "b" * 64}}}
    assert provenance_fields() == {} and provenance_fields(ema=False) == {"ema": False}
    assert provenance_fields(sampling={"steps": 100, "cfg_scale": 2}) == {"sampling_steps": 100,
                                                                          "guidance_scale": 2.0}  # old names
    json.dumps(out)  # goes into results.json as it is
    for bad, match in ((dict(sampling={"sampling_steps": 0}), "sampling_steps=0"),
                       (dict(num_samples=True), "num_samples=True"),
                       (dict(sampling={"guidance_scale": float("nan")}), "guidance_scale=nan"),
                       (dict(sampling={"guidance_interval": (0.5, 0.1)}), r"guidance_interval=\[0.5, 0.1\]"),
                       (dict(sampling={"seed": 1}), "'seed' is not known"),
                       (dict(ema="yes"), "ema='yes'"), (dict(reference_sha256="abc"), "64 hex")):
        with pytest.raises(UsageError, match=match):
            provenance_fields(**bad)
