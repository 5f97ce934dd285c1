"""What the width step of a connection hands to its depth step: a leaf that the reference connections and every
kernel (torch, Triton) import, so neither imports the other for it."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["WidthContext"]


class WidthContext(NamedTuple):
    """What the depth step needs from the width step: the mixed residual streams and the output weights B."""

    residual: torch.Tensor  # (..., n, c)
    beta: torch.Tensor  # (n,) static or (..., n) per token
