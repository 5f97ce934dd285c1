"""Evaluation: top-1/top-5 for classifiers; generative metrics (FID, sFID, IS, precision/recall, KID, FD-DINOv2), their
extractors and the provenance of a result.

Importing this package registers the ``hcv-inception-v3-compat``, ``hcv-digits`` and ``hcv-dinov2`` feature extractors
with torch-fidelity. The command line is ``python -m hcvision.eval.generative`` (not imported here, so ``-m`` runs it
once).
"""
from .classification import (TopKAccumulator, evaluate, evaluate_with_ema, load_classifier_weights, topk_accuracy,
                             topk_correct, topk_hits)
from .dinov2 import DINOV2_EXTRACTOR, DINOV2_WEIGHTS_ENV, DinoV2FeatureExtractor, dinov2_preprocess, load_dinov2
from .features import (
    DIGITS_CLASSIFIER_ENV,
    DIGITS_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    INCEPTION_WEIGHTS_ENV,
    SPATIAL_FEATURE,
    DigitsFeatureExtractor,
    SafeInceptionV3,
    WeightsUnavailableError,
    class_accuracy,
    check_digits_classifier,
    digits_preprocess,
    digits_to_uint8,
    load_digits_classifier,
    load_inception_state_dict,
    save_digits_classifier,
)
from .metrics import (
    GenerativeEvaluation,
    cls_acc,
    compute_stats,
    evaluate_generative,
    frechet_distance,
    generative_metrics,
    metrics_from_stats,
    save_reference_stats,
    score_samples,
)
from .npz import FeatureStats, load_image_folder, load_npz_samples, load_stats, save_npz_samples, save_stats
from .provenance import PROVENANCE_KEYS, SAMPLING_KEYS, input_sha256, provenance_fields

__all__ = [
    "TopKAccumulator",
    "evaluate",
    "evaluate_with_ema",
    "load_classifier_weights",
    "topk_accuracy",
    "topk_correct",
    "topk_hits",
    "DIGITS_CLASSIFIER_ENV",
    "DIGITS_EXTRACTOR",
    "DINOV2_EXTRACTOR",
    "DINOV2_WEIGHTS_ENV",
    "INCEPTION_EXTRACTOR",
    "INCEPTION_WEIGHTS_ENV",
    "PROVENANCE_KEYS",
    "SAMPLING_KEYS",
    "SPATIAL_FEATURE",
    "DigitsFeatureExtractor",
    "DinoV2FeatureExtractor",
    "FeatureStats",
    "GenerativeEvaluation",
    "SafeInceptionV3",
    "WeightsUnavailableError",
    "check_digits_classifier",
    "class_accuracy",
    "cls_acc",
    "compute_stats",
    "digits_preprocess",
    "digits_to_uint8",
    "dinov2_preprocess",
    "evaluate_generative",
    "frechet_distance",
    "generative_metrics",
    "input_sha256",
    "load_digits_classifier",
    "load_dinov2",
    "load_image_folder",
    "load_inception_state_dict",
    "load_npz_samples",
    "load_stats",
    "metrics_from_stats",
    "provenance_fields",
    "save_digits_classifier",
    "save_npz_samples",
    "save_reference_stats",
    "save_stats",
    "score_samples",
]
