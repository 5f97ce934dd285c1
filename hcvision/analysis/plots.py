"""Paper-style pictures (Hyper-Connections, arXiv 2409.19606, Figs. 3, 7, 12, 13), drawn with matplotlib's Agg backend.

Every function writes one PNG atomically (a temporary file in the target folder, then a rename) and returns its path.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from ..io import atomic_write
from .similarity import LayerSimilarity
from .unfold import ConnectionMatrices
from .weights import WeightDistribution

__all__ = ["plot_connection_matrix", "plot_unfolded", "plot_layer_similarity", "plot_weight_distributions",
           "save_figure"]

PathLike = Union[str, os.PathLike]
ATTENTION_COLOR = "tab:green"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically and close it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; got path {str(path)!r}, accepted: a path ending in .png")
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        _pyplot().close(fig)
    return path


def _draw_matrix(ax, C: torch.Tensor, attention: Sequence[bool], title: Optional[str], vmax: Optional[float] = None,
                 annotate: Optional[bool] = None):
    """Lower-triangular heatmap of ``C`` (entries on and above the diagonal are blank), attention ids in green."""
    C = C.detach().float().cpu()
    size = C.shape[0]
    masked = C.clone()
    masked[torch.triu(torch.ones(size, size, dtype=torch.bool))] = float("nan")
    lim = vmax if vmax is not None else float(torch.nan_to_num(masked, nan=0.0).abs().max().clamp_min(1e-12))
    im = ax.imshow(masked.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ticks = list(range(size))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    fs = max(4, min(9, int(180 / max(size, 1))))
    ax.set_xticklabels([str(t) for t in ticks], fontsize=fs)
    ax.set_yticklabels([str(t) for t in ticks], fontsize=fs)
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for t, lab in zip(ticks, labels):
            if t < len(attention) and attention[t]:
                lab.set_color(ATTENTION_COLOR)
                lab.set_fontweight("bold")
    for t in ticks:
        if t < len(attention) and attention[t]:
            ax.tick_params(axis="both", which="major", length=3)
    ax.set_xlabel("source layer j (0 = embedding)")
    ax.set_ylabel("target layer k (L+1 = output)")
    if annotate is None:
        annotate = size <= 16
    if annotate:
        for r in range(size):
            for c in range(r):
                v = float(C[r, c])
                ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=max(4, fs - 2),
                        color="white" if abs(v) > 0.6 * lim else "black")
    if title:
        ax.set_title(title, fontsize=10)
    return im


def _matrix_and_attention(C: Union[torch.Tensor, ConnectionMatrices], attention: Optional[Sequence[bool]]):
    if isinstance(C, ConnectionMatrices):
        return C.C, (attention if attention is not None else C.attention)
    C = torch.as_tensor(C)
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"connection matrix must be square (L+2, L+2), got shape {tuple(C.shape)}")
    if attention is None:  # the paper's convention: attention sublayers have odd ids
        attention = [0 < i < C.shape[0] - 1 and i % 2 == 1 for i in range(C.shape[0])]
    return C, attention


def plot_connection_matrix(
    C: Union[torch.Tensor, ConnectionMatrices],
    path: PathLike,
    title: Optional[str] = None,
    *,
    attention: Optional[Sequence[bool]] = None,
    annotate: Optional[bool] = None,
) -> Path:
    """Heatmap of an unfolded connection matrix ``C^(0)`` (HC Fig. 7): lower-triangular, attention ids in green.

    ``C`` is an ``(L+2, L+2)`` tensor or a :class:`ConnectionMatrices` (then its ``C`` and attention flags). Without
    flags, odd ids are taken as attention sublayers (the paper's convention for attention/MLP blocks).
    """
    plt = _pyplot()
    C, attention = _matrix_and_attention(C, attention)
    size = C.shape[0]
    side = max(3.5, 0.32 * size + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = _draw_matrix(ax, C, attention, title, annotate=annotate)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def plot_unfolded(result: ConnectionMatrices, path: PathLike, title: Optional[str] = None) -> Path:
    """``C^(0)`` and every ``C^(i)`` side by side on one colour scale (HC Fig. 13)."""
    plt = _pyplot()
    panels = [("$C^{(0)}$", result.C)] + [(f"$C^{{({i + 1})}}$", result.hyper[i]) for i in range(result.hyper.shape[0])]
    size = result.C.shape[0]
    side = max(3.0, 0.25 * size + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1.0, side), squeeze=False)
    lim = max(float(torch.tril(p, -1).abs().max()) for _, p in panels) or 1.0
    im = None
    for ax, (name, mat) in zip(axes[0], panels):
        im = _draw_matrix(ax, mat, result.attention, name, vmax=lim, annotate=False)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.02)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_layer_similarity(
    results: Union[LayerSimilarity, Mapping[str, LayerSimilarity]],
    path: PathLike,
    title: Optional[str] = "cosine similarity of consecutive sublayer inputs",
) -> Path:
    """Median (line) and 5-95 % band (shaded) per sublayer, one colour per model (HC Fig. 3)."""
    plt = _pyplot()
    if isinstance(results, LayerSimilarity):
        results = {"model": results}
    if not results:
        raise ValueError("no layer-similarity results to plot; pass a LayerSimilarity or a non-empty mapping")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, r in results.items():
        line, = ax.plot(r.layer_ids, r.median.tolist(), marker="o", ms=3, label=label)
        ax.fill_between(r.layer_ids, r.p05.tolist(), r.p95.tolist(), color=line.get_color(), alpha=0.2)
    first = next(iter(results.values()))
    for k, att in zip(first.layer_ids, first.attention):
        if att:
            ax.axvline(k, color=ATTENTION_COLOR, lw=0.5, alpha=0.3)
    ax.set_xlabel("sublayer k (green lines: attention)")
    ax.set_ylabel("cos(input k, input k-1)")
    ax.set_ylim(min(-0.05, min(float(r.p05.min()) for r in results.values()) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_weight_distributions(dist: WeightDistribution, path: PathLike, title: Optional[str] = None,
                              max_entries: Optional[int] = None) -> Path:
    """One violin per class for each entry of the connection matrix (HC Fig. 12)."""
    plt = _pyplot()
    entries = dist.entries[:max_entries] if max_entries else dist.entries
    classes = list(dist.values)
    if not classes:
        raise ValueError("the weight distribution has no classes to plot")
    cols = min(4, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    labels = [dist.class_names.get(c, str(c)) if dist.class_names else str(c) for c in classes]
    for e, ax in zip(range(len(entries)), axes.flat):
        data = [dist.values[c][:, e].numpy() for c in classes]
        if all(d.size > 1 and d.std() > 0 for d in data):
            ax.violinplot(data, showmedians=True)
        else:  # a constant entry (e.g. fresh weights) cannot be drawn as a density
            ax.boxplot(data)
        ax.set_xticks(range(1, len(classes) + 1))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(entries[e], fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(entries):]:
        ax.set_visible(False)
    fig.suptitle(title or f"{dist.layer_name} weights per class ({dist.reduce})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
