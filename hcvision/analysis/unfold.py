"""Unfolded connection matrices (Hyper-Connections, arXiv 2409.19606, Sec. 4.5 and App. F, Eqs. 20, 27-29).

Layers are numbered as in the paper: ``0`` = the embedding (``T^0 = id``), ``1..L`` = the sublayers in the order they
run (attention, MLP, attention, ...), ``L+1`` = the read-out before the final norm. For every target ``k`` and source
``j < k`` the unfolding gives the weight ``c_kj`` with which ``T^j`` enters the input of layer ``k`` (Eq. 20)::

    h_in^k = sum_{j<k} c_kj T^j,         c_kj = B^j (prod_{t=j+1}^{k-1} A_r^t) A_m^k         (Eq. 27)

and, for the ``n`` hyper hiddens carried past layer ``k`` (``H'^k = A_r^{kT} H^k``, Eq. 28),
``c_kj^(i) = (B^j prod_{t=j+1}^{k} A_r^t)_i`` (Eq. 29).

One formula for every kind. Write ``k`` for the number of branch-input slots (1 for residual/HC/mHC, ``m`` for FC)
and let ``W^j`` (``k x n``) say how slot ``s`` of ``T^j``'s output is written into stream ``i``:

* HC kinds: ``W^j = B^j`` (one slot, copied into every stream with weight ``beta_i``);
* FC kinds: ``W^j = diag(B^j)`` (fraction ``i`` of the output goes to stream ``i`` with weight ``beta_i``);
* embedding (``j = 0``): the stream expansion, ``W^0 = 1_{1xn}`` for HC (``n`` copies: the paper's "ones") and
  ``W^0 = I_m`` for FC (the embedding is *split*, so "ones" means each fraction lands once, in its own stream);
* read-out (``k = L+1``): ``A_m^{L+1} = 1_{nx1}`` for HC (sum of the streams), ``I_m`` for FC (concatenation).

Then ``c_kj = W^j (prod_{t=j+1}^{k-1} A_r^t) A_in^k`` is a ``k x k`` block: entry ``(f, s)`` is the weight of fraction
``f`` of ``T^j`` in input slot ``s`` of layer ``k``, i.e. ``h_in^k[s] = sum_j sum_f c_kj[f, s] T^j[f]``. For HC kinds it
is Eq. 27's scalar. The scalar shown in the pictures is ``tr(c_kj) / k``: the Frobenius projection of the block onto
``c I`` (the best single number, exact whenever the block is a multiple of ``I``; the off-diagonal part moves a fraction
into another channel group and is kept in ``blocks``). For the hyper hiddens the scalar is the fraction-``i`` entry
``(W^j prod A_r)[i, i]`` for FC and the ``i``-th entry for HC.

With the init of HC Eq. 14 / FC Eq. 15 / the residual (``[[0, 1], [1, 1]]``, Eq. 15) ``c_kj = 1`` for every
``0 <= j < k <= L``: the Pre-Norm pattern. The read-out row is ``n`` for HC kinds (the ``n`` identical streams are
summed; the final LayerNorm is scale-invariant) and 1 for residual and FC.

Dynamic kinds (DHC, DFC, mHC) have a matrix per token. The unfolding is a *product* of per-layer matrices, so averaging
the matrices first and unfolding the average is not the average connection strength; we unfold per token (the exact
decomposition of that token's layer inputs) and then average over tokens and images. ``per_token=True`` keeps the
per-token unfoldings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..connections import Connection, kind_record
from .capture import captured_chunks

__all__ = ["ConnectionMatrices", "connection_matrix", "unfold_matrices", "stream_maps"]


def stream_maps(kind: str, num_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding's write map ``W^0`` (``k x n``) and the read-out ``A_m^{L+1}`` (``n x k``); see module doc."""
    if kind_record(kind).fractions:
        eye = torch.eye(num_streams)
        return eye, eye.clone()
    return torch.ones(1, num_streams), torch.ones(num_streams, 1)


def _write_map(beta: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """``W^j`` from ``B^j`` of shape ``(T, n)``: ``(T, 1, n)`` for HC, ``diag(B)`` ``(T, m, m)`` for FC."""
    if num_inputs == 1:
        return beta.unsqueeze(-2)
    return torch.diag_embed(beta)


def unfold_matrices(
    layers: Sequence[torch.Tensor], kind: str, num_inputs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfold per-layer connection matrices (Eqs. 27, 29).

    Args:
        layers: ``L`` matrices ``[[0, B], [A_in, A_r]]`` of shape ``(T, 1+n, k+n)`` (``T`` tokens, 1 for static kinds;
            shapes broadcast), in the order the sublayers run.
        kind: connection kind (decides the embedding and read-out maps).
        num_inputs: ``k``, the branch-input slots (1 for HC kinds, ``m`` for FC).

    Returns:
        ``blocks`` ``(T, L+2, L+2, k, k)``: ``blocks[:, a, b]`` = ``c_ab`` of the module docstring (0 for ``b >= a``);
        ``hyper`` ``(T, L+2, L+2, k, n)``: ``hyper[:, a, b]`` = ``W^b prod_{t=b+1}^{a} A_r^t`` (Eq. 29 before taking
        stream ``i``), row ``L+1`` being the last streams (``A_r^{L+1} = I``).
    """
    if not layers:
        raise ValueError("no connection matrices to unfold (the forward pass called no connection)")
    k = num_inputs
    n = layers[0].shape[-2] - 1
    if layers[0].shape[-1] != k + n:
        raise ValueError(f"matrices of shape {tuple(layers[0].shape[-2:])} do not fit num_inputs={k}; "
                         f"expected (1+n, {k}+n)")
    tokens = max(m.shape[0] for m in layers)
    mats = [m.float().expand(tokens, *m.shape[-2:]) for m in layers]
    L = len(mats)
    w0, readout = stream_maps(kind, n)
    dev = mats[0].device
    writes = [w0.to(dev).expand(tokens, k, n)] + [_write_map(m[:, 0, k:], k) for m in mats]
    blocks = mats[0].new_zeros(tokens, L + 2, L + 2, k, k)
    hyper = mats[0].new_zeros(tokens, L + 2, L + 2, k, n)
    readout = readout.to(dev)
    for j in range(L + 1):  # source layer j (0 = embedding)
        v = writes[j]  # (T, k, n): where T^j sits in the streams right after layer j
        for t in range(j + 1, L + 1):  # layer t = 1..L reads then carries
            a_in, a_r = mats[t - 1][:, 1:, :k], mats[t - 1][:, 1:, k:]
            blocks[:, t, j] = v @ a_in
            v = v @ a_r
            hyper[:, t, j] = v
        blocks[:, L + 1, j] = v @ readout
        hyper[:, L + 1, j] = v
    return blocks, hyper


def _scalar(blocks: torch.Tensor) -> torch.Tensor:
    """``tr(c) / k`` of ``(..., k, k)`` blocks."""
    return blocks.diagonal(dim1=-2, dim2=-1).mean(-1)


def _hyper_scalar(hyper: torch.Tensor) -> torch.Tensor:
    """``(..., A, B, k, n) -> (..., n, A, B)``: the stream-``i`` weight (HC: slot 0; FC: fraction ``i``)."""
    k, n = hyper.shape[-2:]
    per_stream = hyper[..., 0, :] if k == 1 else hyper.diagonal(dim1=-2, dim2=-1)
    return per_stream.movedim(-1, -3)


@dataclass
class ConnectionMatrices:
    """Result of :func:`connection_matrix`. Rows/columns: 0 = embedding, 1..L = sublayers, L+1 = read-out.

    Attributes:
        C: ``C^(0)``, ``(L+2, L+2)``: scalar ``c_kj`` (mean over tokens for dynamic kinds).
        hyper: ``C^(i)`` for ``i = 1..n``, ``(n, L+2, L+2)`` (index 0 is stream 1).
        blocks / hyper_blocks: the full ``(L+2, L+2, k, k)`` / ``(L+2, L+2, k, n)`` blocks (FC fractions).
        layer_names: ``["embed", <connection module names>..., "output"]``.
        attention: for each of the ``L+2`` ids, whether it is an attention sublayer.
        layer_matrices: ``(L, 1+n, k+n)`` per-layer matrices (token mean for dynamic kinds).
        per_token / per_token_blocks: ``(T, L+2, L+2)`` / ``(T, L+2, L+2, k, k)`` when ``per_token=True``.
        num_tokens: tokens averaged over.
    """

    kind: str
    num_streams: int
    num_inputs: int
    C: torch.Tensor
    hyper: torch.Tensor
    blocks: torch.Tensor
    hyper_blocks: torch.Tensor
    layer_names: list[str]
    attention: list[bool]
    layer_matrices: torch.Tensor
    num_tokens: int
    dynamic: bool
    per_token: Optional[torch.Tensor] = None
    per_token_blocks: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """``L``, the number of sublayers."""
        return self.C.shape[0] - 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-token data)."""
        return {
            "kind": self.kind, "num_streams": self.num_streams, "num_inputs": self.num_inputs,
            "dynamic": self.dynamic, "num_tokens": self.num_tokens, "layer_names": self.layer_names,
            "attention": self.attention, "C0": self.C.tolist(), "C_hyper": self.hyper.tolist(),
            "layer_matrices": self.layer_matrices.tolist(),
        }


def _is_attention(name: str) -> bool:
    return "attn" in name.split(".")[-1]


def _token_index(total: int, max_tokens: Optional[int], generator: torch.Generator) -> Optional[torch.Tensor]:
    if max_tokens is None or max_tokens >= total:
        return None
    return torch.randperm(total, generator=generator)[:max_tokens].sort().values


@torch.no_grad()
def connection_matrix(
    model: nn.Module,
    images: Any,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    per_token: bool = False,
    max_tokens: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> ConnectionMatrices:
    """Unfolded connection matrices ``C^(0)`` and ``C^(i)`` of ``model`` (HC Eqs. 20, 27-29; see module docstring).

    Args:
        model: a model built on :mod:`hcvision.connections` (HC ViT, DiT, ...). It is run in eval mode (restored after).
        images: the input for ``forward``; a tensor is split into ``batch_size`` chunks when given.
        forward: ``forward(model, chunk)``; default ``model(chunk)``. For DiT: ``lambda m, x: m(x, t, y)`` (then
            leave ``batch_size`` unset, or close over matching chunks of ``t`` and ``y`` yourself).
        per_token: also return the per-token unfoldings (dynamic kinds; static kinds repeat one unfolding).
        max_tokens: for dynamic kinds, use at most this many tokens per chunk (a fixed random subset, ``seed``).
        seed: seed of that subset.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    gen = torch.Generator().manual_seed(seed)
    sums: Optional[list[torch.Tensor]] = None
    token_blocks: list[torch.Tensor] = []
    token_count = 0
    names: list[str] = []
    conn: Optional[Connection] = None
    for _, cap in captured_chunks(model, images, forward, batch_size):
        if names and cap.names != names:
            raise ValueError(f"the connections ran in a different order between chunks: {names} vs {cap.names}")
        names, conn = cap.names, cap.calls[0].module
        mats = [c.matrix for c in cap.calls]
        tokens = cap.calls[0].num_tokens
        if conn.dynamic:
            idx = _token_index(tokens, max_tokens, gen)
            if idx is not None:
                mats = [m[idx] if m.shape[0] > 1 else m for m in mats]
                tokens = idx.numel()
        blocks, hyper = unfold_matrices(mats, conn.kind, conn.num_inputs)
        weight = tokens if blocks.shape[0] == 1 else 1
        parts = [blocks.sum(0) * weight, hyper.sum(0) * weight,
                 torch.stack([m.sum(0) if m.shape[0] > 1 else m[0] * tokens for m in mats])]
        sums = parts if sums is None else [a + b for a, b in zip(sums, parts)]
        token_count += tokens
        if per_token:
            token_blocks.append(blocks.expand(tokens, *blocks.shape[1:]))
    assert sums is not None and conn is not None
    blocks_mean, hyper_mean, layer_mean = (s / token_count for s in sums)
    attention = [False] + [_is_attention(n) for n in names] + [False]
    result = ConnectionMatrices(
        kind=conn.kind, num_streams=conn.num_streams, num_inputs=conn.num_inputs,
        C=_scalar(blocks_mean), hyper=_hyper_scalar(hyper_mean), blocks=blocks_mean, hyper_blocks=hyper_mean,
        layer_names=["embed", *names, "output"], attention=attention, layer_matrices=layer_mean,
        num_tokens=token_count, dynamic=bool(conn.dynamic),
    )
    if per_token:
        pt = torch.cat(token_blocks, 0)
        result.per_token_blocks = pt
        result.per_token = _scalar(pt)
    return result
