"""Distributions of dynamic connection weights per class (Hyper-Connections, arXiv 2409.19606, Fig. 12).

For a dynamic kind (DHC, DFC, mHC) every token has its own matrix ``[[0, B], [A_in, A_r]]`` (HC Eqs. 8-13). The paper
shows, for the last DHC of ViT-B/16-DHCx2, the values of ``beta`` and ``alpha`` over validation samples of a few
classes: ``beta`` is concentrated within a class, ``alpha`` varies more and differs between classes.

Entry names follow HC Eq. 1 (1-based streams): ``beta_j`` = ``B_j``; ``alpha_i0`` = ``A_m`` of stream ``i`` (mHC:
``H_pre``); ``alpha_ij`` = ``A_r[i, j]``. FC (Frac-Connections Eq. 7) names its read-in ``gamma_is`` (``Y[i, s]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..connections import kind_record, kind_records
from .capture import captured_chunks

__all__ = ["WeightDistribution", "connection_weights", "entry_names", "REDUCTIONS"]

REDUCTIONS = ("tokens", "mean", "first")


def entry_names(kind: str, num_streams: int, num_inputs: int) -> list[tuple[str, int, int]]:
    """``(name, row, column)`` of every free entry of the ``(1+n, k+n)`` connection matrix."""
    n, k = num_streams, num_inputs
    out = [(f"beta_{j + 1}", 0, k + j) for j in range(n)]
    for i in range(n):
        if kind_record(kind).fractions:
            out += [(f"gamma_{i + 1}{s + 1}", 1 + i, s) for s in range(k)]
        else:
            out.append((f"alpha_{i + 1}0", 1 + i, 0))
        out += [(f"alpha_{i + 1}{j + 1}", 1 + i, k + j) for j in range(n)]
    return out


@dataclass
class WeightDistribution:
    """Result of :func:`connection_weights`: ``values[c]`` is ``(samples, entries)`` for class ``c``."""

    layer_name: str
    layer_index: int  # 0-based position among the sublayers
    entries: list[str]
    values: dict[int, torch.Tensor]
    reduce: str
    class_names: Optional[dict[int, str]] = None

    def summary(self) -> dict[str, Any]:
        """Per class and entry: mean, std, median, 5 % and 95 % quantiles (JSON-ready)."""
        out: dict[str, Any] = {}
        for c, v in self.values.items():
            q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95]), dim=0)
            label = self.class_names.get(c, str(c)) if self.class_names else str(c)
            out[label] = {e: {"mean": v[:, i].mean().item(), "std": v[:, i].std(unbiased=False).item(),
                              "median": q[1, i].item(), "p05": q[0, i].item(), "p95": q[2, i].item()}
                          for i, e in enumerate(self.entries)}
        return {"layer": self.layer_name, "reduce": self.reduce, "samples": {str(c): len(v) for c, v in
                                                                               self.values.items()}, "stats": out}


@torch.no_grad()
def connection_weights(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Optional[Sequence[int]] = None,
    layer: int = -1,
    reduce: str = "tokens",
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    batch_size: Optional[int] = None,
    class_names: Optional[dict[int, str]] = None,
) -> WeightDistribution:
    """Per-class values of one dynamic connection's weights (HC Fig. 12).

    Args:
        images, labels: samples and their classes (``labels`` of shape ``(N,)``).
        classes: classes to keep (default: all present in ``labels``).
        layer: which sublayer's connection, in call order (default ``-1``: the last one, as in the paper).
        reduce: ``"tokens"`` (every token of every sample is one value), ``"mean"`` (token mean per sample) or
            ``"first"`` (the first token, e.g. the class token).
        forward: ``forward(model, chunk)``, default ``model(chunk)``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not valid; accepted: {', '.join(REDUCTIONS)}")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {labels.numel()} labels")
    present = sorted(set(labels.tolist()))
    classes = present if classes is None else [int(c) for c in classes]
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"classes {missing} have no samples; classes present: {present}")
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    rows: list[torch.Tensor] = []
    name, index, entries = "", 0, []
    for chunk, cap in captured_chunks(model, images, forward, batch_size):
        L = len(cap.calls)
        if not -L <= layer < L:
            raise ValueError(f"layer={layer} is out of range for {L} sublayers; accepted: {-L}..{L - 1}")
        call = cap.calls[layer]
        conn = call.module
        if not conn.dynamic:
            raise ValueError(f"connection kind {conn.kind!r} is static (one matrix for all inputs); weight "
                             "distributions need a dynamic kind: "
                             f"{', '.join(r.name for r in kind_records() if r.dynamic)}")
        name, index = call.name, layer % L
        entries = entry_names(conn.kind, conn.num_streams, conn.num_inputs)
        mats = call.matrix.reshape(chunk.shape[0], -1, *call.matrix.shape[-2:])  # (B, N, 1+n, k+n)
        vals = torch.stack([mats[..., r, c] for _, r, c in entries], -1)  # (B, N, E)
        if reduce == "mean":
            vals = vals.mean(1, keepdim=True)
        elif reduce == "first":
            vals = vals[:, :1]
        rows.append(vals)
    vals = torch.cat(rows, 0)  # (N, tokens, E)
    values = {c: vals[labels == c].flatten(0, 1) for c in classes}
    return WeightDistribution(layer_name=name, layer_index=index, entries=[e[0] for e in entries], values=values,
                              reduce=reduce, class_names=class_names)
