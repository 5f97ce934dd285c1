"""Top-k classification metrics, and the classifier evaluation ``train_cls.py`` runs.

Counts (not means) are accumulated so results are exact when summed over batches and ranks;
divide once at the end.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch

from ..cli import UsageError

__all__ = ["topk_hits", "topk_correct", "topk_accuracy", "TopKAccumulator", "evaluate", "evaluate_with_ema",
           "load_classifier_weights", "recorded_classifier"]


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
        out: Dict[str, float] = {f"top{k}": 100.0 * c.item() / max(1, self.count)
                                 for k, c in zip(self.ks, self.correct)}
        out["num_samples"] = self.count
        return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, accelerator: Any, ks: Sequence[int] = (1, 5)
             ) -> Dict[str, float]:
    """Top-k over a whole (sharded) split of ``(images, targets, unreadable count)`` batches.

    Hits are gathered per sample, so ``gather_for_metrics`` drops the padding of an uneven split; unreadable files
    arrive as target -1 and are left out (and counted under ``skipped_images``).
    """
    was_training = model.training
    model.eval()
    acc, skipped = TopKAccumulator(ks), 0
    for x, y, n_bad in loader:
        skipped += int(torch.as_tensor(n_bad).sum())  # per-sample counts under DDP stream dispatch
        logits = model(x) if len(y) else torch.zeros(0, 1, device=y.device)
        acc.add_hits(*accelerator.gather_for_metrics((topk_hits(logits, y, ks), y >= 0)))
    model.train(was_training)
    skipped_t = accelerator.reduce(torch.tensor([skipped], device=accelerator.device), reduction="sum")
    return {**acc.compute(), "skipped_images": int(skipped_t.item())}


def evaluate_with_ema(model: torch.nn.Module, ema_model: Optional[torch.nn.Module], loader: Iterable,
                      accelerator: Any) -> Dict[str, float]:
    """:func:`evaluate` for the trained weights, plus ``ema_top*`` for the EMA weights when there are some."""
    metrics = evaluate(model, loader, accelerator)
    if ema_model is not None:
        metrics.update({f"ema_{k}": v for k, v in evaluate(ema_model, loader, accelerator).items() if "top" in k})
    return metrics


def load_classifier_weights(model: torch.nn.Module, checkpoint: str, model_name: str, num_classes: int) -> str:
    """Load ``checkpoint`` (hcvision safetensors, a timm ``train.py`` checkpoint, a run or checkpoint directory) into
    ``model`` for evaluation on data with ``num_classes`` classes; returns the file used. Every misfit (missing,
    damaged, non-finite, another class count or model) is a :class:`UsageError`."""
    from .. import io
    from ..models.loading import load_state_into

    path = io.resolve_weights(checkpoint, ema=False)
    source = f"checkpoint {str(path)!r}"
    state = io.unwrap_state_dict(io.load_weights(path)[0])
    io.check_finite(state, source)
    head = state.get(f"{model.pretrained_cfg.get('classifier', 'head')}.weight")
    if head is not None and head.shape[0] != num_classes:
        raise UsageError(f"{source} has {head.shape[0]} classes but the data has {num_classes}; evaluate on data "
                         "with the same classes or pass a matching checkpoint")
    load_state_into(model, state, source, model_name)
    return str(path)


def recorded_classifier(checkpoint: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """The model name and kwargs a run recorded for ``checkpoint`` (a weights file, a run or checkpoint
    directory): the weights' metadata, else the run's ``config.yaml``; ``(None, {})`` when neither says."""
    import yaml

    from .. import io
    from ..models.loading import recorded_model

    path = io.resolve_weights(checkpoint, ema=False)
    name, kwargs = recorded_model(io.read_metadata(path), f"checkpoint {str(path)!r}")
    if not name:  # e.g. an accelerate checkpoint directory: its run's config.yaml names the model
        for run_dir in (path.parent, path.parent.parent.parent):
            config = run_dir / "config.yaml"
            if config.is_file():
                try:
                    recorded = yaml.safe_load(config.read_text()) or {}
                except (OSError, yaml.YAMLError):
                    break
                if isinstance(recorded, dict) and isinstance(recorded.get("model"), str):
                    kwargs = recorded.get("model_kwargs")
                    name, kwargs = recorded["model"], dict(kwargs) if isinstance(kwargs, dict) else {}
                break
    kwargs.pop("num_classes", None)  # the data decides; a head that does not fit is reported on loading
    return name, kwargs

