"""Data sets: ImageFolder (ImageNet layout) with timm transforms and the embedded sklearn digits."""
from .classification import classification_datasets, digits_collate
from .digits import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, DigitsDataset, digits_split_indices
from .folder import (
    SafeImageFolder,
    SeededTransformDataset,
    build_timm_transform,
    check_image_folder,
    collate_skip_bad,
)

__all__ = [
    "classification_datasets",
    "digits_collate",
    "DIGITS_SPLIT_SEED",
    "DIGITS_VAL_FRACTION",
    "DigitsDataset",
    "digits_split_indices",
    "SafeImageFolder",
    "SeededTransformDataset",
    "build_timm_transform",
    "check_image_folder",
    "collate_skip_bad",
]
