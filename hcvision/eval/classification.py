"""Top-k classification metrics.

Counts (not means) are accumulated so results are exact when summed over batches and ranks;
divide once at the end.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["topk_hits", "topk_correct", "topk_accuracy", "TopKAccumulator"]


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Per-sample hits, ``(batch, len(ks))`` bool: is the target among the ``k`` highest logits.

    ``k`` larger than the number of classes counts every sample (top-5 on 3 classes is 100%).
    Ties are broken by ``torch.topk``.  Per-sample values (not sums) are what
    ``accelerator.gather_for_metrics`` needs to drop the padding of an uneven last batch.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match batch of logits {logits.shape[0]}")
    if any(k < 1 for k in ks):
        raise ValueError(f"ks={tuple(ks)} must all be >= 1")
    if logits.shape[0] == 0:
        return torch.zeros(0, len(ks), dtype=torch.bool, device=logits.device)
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    cum = top.eq(targets[:, None]).cumsum(dim=1) > 0  # hit within the first j+1 predictions
    return torch.stack([cum[:, min(k, maxk) - 1] for k in ks], dim=1)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k`` (long tensor)."""
    return topk_hits(logits, targets, ks).sum(dim=0)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``{"top1": %, "top5": %}`` in percent for one batch of logits."""
    n = max(1, logits.shape[0])
    counts = topk_correct(logits, targets, ks)
    return {f"top{k}": 100.0 * c.item() / n for k, c in zip(ks, counts)}


class TopKAccumulator:
    """Sum top-k hits over batches (and ranks); ``compute()`` returns percentages and the sample count.

    ``update(logits, targets)`` counts one local batch; ``add_hits(hits, valid)`` counts per-sample hits that were
    already gathered across processes (``accelerator.gather_for_metrics((topk_hits(...), valid))``, which drops the
    padding of an uneven last batch), leaving out samples whose ``valid`` entry is False (unreadable images).
    """

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks = tuple(ks)
        self.correct = torch.zeros(len(self.ks), dtype=torch.long)
        self.count = 0

    def add_hits(self, hits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        if hits.dim() != 2 or hits.shape[1] != len(self.ks):
            raise ValueError(f"hits must be (batch, {len(self.ks)}) for ks={self.ks}, got {tuple(hits.shape)}")
        if valid is not None:
            hits = hits[valid.to(torch.bool)]
        self.correct += hits.long().sum(0).cpu()
        self.count += int(hits.shape[0])

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.add_hits(topk_hits(logits, targets, self.ks))

    def compute(self) -> Dict[str, float]:
        out: Dict[str, float] = {f"top{k}": 100.0 * c.item() / max(1, self.count) for k, c in zip(self.ks, self.correct)}
        out["num_samples"] = self.count
        return out
