"""Data sets: ImageFolder (ImageNet layout), WebDataset and HF datasets with timm transforms the user controls,
and the embedded sklearn digits (exportable as an ImageFolder: ``python -m hcvision.data.digits --export DIR``)."""
from .classification import classification_datasets, digits_collate
from .digits import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, DigitsDataset, digits_split_indices
from .folder import (
    SafeImageFolder,
    SeededTransformDataset,
    check_image_folder,
    collate_skip_bad,
)
from .transforms import TransformOptions, build_timm_transform

__all__ = [
    "classification_datasets",
    "digits_collate",
    "DIGITS_SPLIT_SEED",
    "DIGITS_VAL_FRACTION",
    "DigitsDataset",
    "digits_split_indices",
    "SafeImageFolder",
    "SeededTransformDataset",
    "TransformOptions",
    "build_timm_transform",
    "check_image_folder",
    "collate_skip_bad",
]
