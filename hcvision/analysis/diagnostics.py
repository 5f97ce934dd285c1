"""Connection diagnostics cheap enough to log while training.

:func:`connection_diagnostics` reads only the static connection matrices (no forward pass, no hooks; a few
microseconds per layer, mHC adds one batched 20-step Sinkhorn on the ``n x n`` biases):

* ``conn/res_dist_mean`` / ``conn/res_dist_max``: Frobenius distance ``||A_r - I||_F`` of each layer's stream-to-stream
  matrix from the identity, mean and max over layers. ``A_r`` is the residual part of the width matrix (HC Eq. 1);
  for mHC it is ``H_res^T`` (same norm). HC and FC start at 0 (``A_r = I``); mHC starts at the Sinkhorn projection
  of its bias, close to but not at ``I``.
* ``conn/width_dist_mean`` / ``..._max``: the same for the whole width matrix ``[A_in | A_r]`` against its value at
  init for HC/FC (``[e_{k mod n} | I]`` / ``[I | I]``): how far training moved the static width connection.
* ``conn/beta_mean``, ``conn/beta_std`` (over all layers and streams), ``conn/beta_range_max`` (max over layers of
  ``max_i B_i - min_i B_i``): the depth weights (mHC: ``H_post``). All start at 1, range 0.
* ``conn/composite_gain_fwd`` / ``conn/composite_gain_bwd``: mHC's Amax gain magnitude (mHC Sec. 3.1 / Fig. 3) of
  the composite residual map ``P_l = H^L ... H^l`` from sublayer ``l`` to the end, max over ``l``. Convention:
  ``H = A_r^T`` is the map the width step applies to the streams, ``x'_i = sum_j H_ij x_j`` (row ``i``: output
  stream; mHC's ``H_res``; DeepSeek's ``comb`` is ``A_r``), so the forward (signal) gain is the largest absolute
  **row** sum of ``P_l`` and the backward (gradient) gain the largest absolute **column** sum. What it means per kind:
  the residual path only (the branch outputs, written with ``B``, are not in it); 1 for the identity; for mHC a
  little off 1 (the Sinkhorn residue below, compounded over depth); for mHC-lite and KromHC exactly 1 up to fp32
  rounding (doubly stochastic by construction); for SHC/DHC unconstrained (``A_r`` is learned freely; DHC: its
  static part); for SFC/DFC the map between fractions (different channels, so a row sum adds unlike channels: read it
  as a bound, not a norm).
* ``conn/res_ds_err_mean`` / ``conn/res_ds_err_max``: each layer's distance of ``H = A_r^T`` from the doubly
  stochastic matrices, ``max(max_i |row_i - 1|, max_j |col_j - 1|, max(0, -min_ij H_ij))``, mean and max over layers.
  mHC's 20 Sinkhorn rounds leave up to a few 1e-2 at ordinary logit scales; mHC-lite and KromHC stay at fp32 rounding;
  HC/FC start at 0 (``A_r = I``) and are not constrained.
* ``conn/res_logit_spread_mean`` / ``..._max`` (mHC, mHC-lite, KromHC): per layer, the largest ``max - min`` of the
  static residual logits within one normalised group (mHC: the ``n x n`` Sinkhorn logits; mHC-lite: the ``n!``
  softmax logits; KromHC: each factor's two logits). A large spread means a saturated softmax or Sinkhorn (tiny
  gradients to the small entries; for mHC also slower Sinkhorn convergence). KromHC starts at 8, mHC at ``log(d (n-1)
  / (1 - d))`` (4.0 for n = 4), mHC-lite at the identity's lead.
* ``conn/dynamic_scale_mean``: mean ``|s_a|, |s_b|`` (DHC/DFC) or ``|alpha|`` gates (mHC family): how much the
  token-dependent part can move the matrices away from the static ones above.

For dynamic kinds these are the static parts (the biases the per-token terms are added to). All of them read only the
parameters (no forward pass).

:func:`stream_similarity` needs the streams themselves, so it runs one forward pass on a given batch (eval mode,
no grad) with temporary wrappers on each connection's ``width``: the mean pairwise cosine similarity between the
``n`` hyper streams entering each sublayer (``1.0`` = collapsed to one stream). HC streams start as ``n`` identical
copies (cosine 1) and only diverge as ``A_r`` and ``B`` learn; FC fractions are different channels, not copies, so
FC models report nothing here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from ..connections import Connection, HyperConnection, hc_init_matrix
from .capture import default_forward

__all__ = ["connection_diagnostics", "stream_similarity", "composite_gain", "doubly_stochastic_error",
           "learned_connections"]


def learned_connections(model: nn.Module) -> List[Connection]:
    """The model's non-residual connections in the order the sublayers run (``layer_index``)."""
    conns = [m for m in model.modules() if isinstance(m, Connection) and next(m.parameters(), None) is not None]
    return sorted(conns, key=lambda c: c.layer_index)


def composite_gain(res_maps: torch.Tensor) -> tuple[float, float]:
    """mHC's Amax gain magnitude. ``res_maps`` ``(L, n, n)``: the maps acting on the streams, in the order applied.
    For every start ``l``, ``P_l = M_L ... M_l``; returns the max over ``l`` of (max absolute row sum, max absolute
    column sum) of ``P_l``."""
    maps = res_maps.double()
    prods = torch.empty_like(maps)
    prod = maps[-1]
    prods[-1] = prod
    for layer in range(maps.shape[0] - 2, -1, -1):  # P_l = P_{l+1} M_l, built from the end
        prod = prod @ maps[layer]
        prods[layer] = prod
    a = prods.abs()
    return a.sum(-1).max().item(), a.sum(-2).max().item()


def doubly_stochastic_error(maps: torch.Tensor) -> torch.Tensor:
    """Distance of each ``(..., n, n)`` matrix from the doubly stochastic ones: the largest of ``|row sum - 1|``,
    ``|column sum - 1|`` and ``-min(entry, 0)``. Shape ``(...)``."""
    rows = (maps.sum(-1) - 1).abs().amax(-1)
    cols = (maps.sum(-2) - 1).abs().amax(-1)
    negative = (-maps).clamp(min=0).flatten(-2).amax(-1)
    return torch.maximum(torch.maximum(rows, cols), negative)


@torch.no_grad()
def connection_diagnostics(model: nn.Module) -> Dict[str, float]:
    """Static-matrix diagnostics of ``model``'s connections (see the module docstring); ``{}`` for residual models."""
    conns = learned_connections(model)
    if not conns:
        return {}
    c0 = conns[0]
    k, n = c0.num_inputs, c0.num_streams
    mix, beta = type(c0).stacked_static_coefficients(conns)  # (L, n, k+n), (L, n), fp32
    a_r = mix[:, :, k:]
    eye = torch.eye(n, dtype=a_r.dtype, device=a_r.device)
    res_dist = torch.linalg.matrix_norm(a_r - eye)  # (L,)
    res_maps = a_r.transpose(-1, -2)  # H = A_r^T: x'_i = sum_j H_ij x_j, rows are output streams
    fwd, bwd = composite_gain(res_maps)
    ds_err = doubly_stochastic_error(res_maps.double())  # (L,)
    stats = [res_dist.mean(), res_dist.max(), beta.mean(), beta.std(unbiased=False),
             (beta.max(-1).values - beta.min(-1).values).max(), ds_err.mean().float(), ds_err.max().float()]
    names = ["conn/res_dist_mean", "conn/res_dist_max", "conn/beta_mean", "conn/beta_std", "conn/beta_range_max",
             "conn/res_ds_err_mean", "conn/res_ds_err_max"]
    if isinstance(c0, HyperConnection):  # HC/FC: distance of the whole width matrix from its init (Eq. 14 / FC Eq. 15)
        init = torch.stack([hc_init_matrix(c.kind, n, c.layer_index)[0] for c in conns]).to(mix)
        width_dist = torch.linalg.matrix_norm(mix - init)
        stats += [width_dist.mean(), width_dist.max()]
        names += ["conn/width_dist_mean", "conn/width_dist_max"]
    logits = [c.residual_logits() for c in conns]
    if all(g is not None for g in logits):  # mHC family: saturation of the softmax / Sinkhorn before it
        spread = torch.stack([(g.amax(-1) - g.amin(-1)).max() for g in logits])  # (L,)
        stats += [spread.mean(), spread.max()]
        names += ["conn/res_logit_spread_mean", "conn/res_logit_spread_max"]
    scales = [p for c in conns for p in c.dynamic_scale_parameters()]
    if scales:
        stats.append(torch.cat([p.detach().float().abs().reshape(-1) for p in scales]).mean())
        names.append("conn/dynamic_scale_mean")
    values = torch.stack([s.float() for s in stats]).tolist()  # one sync for all of them
    return {**dict(zip(names, values)), "conn/composite_gain_fwd": fwd, "conn/composite_gain_bwd": bwd}


@contextlib.contextmanager
def _record_streams(conns: List[Connection], sink: List[tuple]) -> Iterator[None]:
    """Wrap each connection instance's ``width`` (both call styles go through it) to record the streams it gets."""
    def wrap(conn: Connection) -> Callable:
        width = conn.width

        def recording_width(H: torch.Tensor):
            sink.append((conn.layer_index, H.detach()))
            return width(H)

        return recording_width

    try:
        for c in conns:
            c.width = wrap(c)  # instance attribute shadows the method; removed below
        yield
    finally:
        for c in conns:
            c.__dict__.pop("width", None)


@torch.no_grad()
def stream_similarity(model: nn.Module, images: Any,
                      forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> Dict[str, float]:
    """Mean pairwise cosine similarity between the hyper streams entering each sublayer, from one forward pass.

    Returns ``conn/stream_cos_mean`` / ``..._max`` / ``..._min`` over sublayers and ``conn/stream_cos_last``
    (the last sublayer); ``{}`` for residual and FC models or ``n = 1``. ``forward(model, images)`` defaults to
    ``model(images)`` (DiT: ``lambda m, x: m(x, t, y)``). The model runs in eval mode; its mode is restored.
    """
    conns = [c for c in learned_connections(model) if c.record.copies and c.num_streams > 1]
    if not conns:
        return {}
    sink: List[tuple] = []
    was_training = model.training
    model.eval()
    try:
        with _record_streams(conns, sink):
            (forward or default_forward)(model, images)
    finally:
        model.train(was_training)
    if not sink:
        raise ValueError("the forward pass called no connection; check the forward= argument")
    per_layer: Dict[int, float] = {}
    for idx, H in sink:
        u = torch.nn.functional.normalize(H.float().flatten(0, -3), dim=-1)  # (tokens, n, C)
        gram = u @ u.transpose(-1, -2)
        n = gram.shape[-1]
        off = (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
        per_layer[idx] = off.mean().item()
    vals = [per_layer[i] for i in sorted(per_layer)]
    return {"conn/stream_cos_mean": sum(vals) / len(vals), "conn/stream_cos_max": max(vals),
            "conn/stream_cos_min": min(vals), "conn/stream_cos_last": vals[-1]}
