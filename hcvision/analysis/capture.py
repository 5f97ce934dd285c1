"""Record what every connection of a model sees during one forward pass.

A model built on :mod:`hcvision.connections` calls each sublayer's connection either as a module
(``conn(H, branch, ...)``, the ViT) or through its two steps (``h, ctx = conn.width(H); conn.depth(y, ctx)``, used
when a branch needs extra inputs, e.g. DiT's gated adaLN branches). A forward pre-hook only sees the first style, so
:func:`capture_connections` wraps the *instance's* ``width`` (and, when asked, ``depth``) instead: both styles go
through them, in the order the sublayers run. The wrappers are removed on exit, also after an error.

Each call yields a :class:`ConnectionCall` with, as requested, the connection matrix (HC Eq. 1; per token for dynamic
kinds, see :meth:`hcvision.connections.Connection.matrix`), the branch input ``h_in^k`` (Eq. 3) and the branch output
``T^k`` (Eq. 5's ``T h_0``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..connections import Connection

__all__ = ["ConnectionCall", "Capture", "capture_connections", "captured_chunks", "find_connections", "default_forward"]


def default_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)``: the classifier call. Pass ``forward=lambda m, x: m(x, t, y)`` for a DiT."""
    return model(images)


def find_connections(model: nn.Module) -> dict[str, Connection]:
    """``{qualified name: Connection}`` of ``model``, or ``ValueError`` if it has none."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, Connection)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no hcvision Connection modules; accepted: a model built on "
                         "hcvision.connections (e.g. timm.create_model('vit_digits_patch2_8_dhc2'))")
    return found


@dataclass
class ConnectionCall:
    """One sublayer call. Token dimensions are flattened: tensors are ``(T, ...)`` with ``T`` tokens (batch x seq)."""

    name: str  # qualified module name, e.g. "blocks.0.attn_conn"
    module: Connection
    matrix: Optional[torch.Tensor] = None  # (T, 1+n, k+n) for dynamic kinds, (1, 1+n, k+n) for static ones
    h_in: Optional[torch.Tensor] = None  # (T, C) branch input
    output: Optional[torch.Tensor] = None  # (T, C) branch output T^k
    num_tokens: int = 0  # tokens this call saw (after token_index)


@dataclass
class Capture:
    """The calls of one forward pass, in order."""

    calls: list[ConnectionCall] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]


@contextlib.contextmanager
def capture_connections(
    model: nn.Module,
    *,
    matrices: bool = True,
    inputs: bool = False,
    outputs: bool = False,
    token_index: Optional[torch.Tensor] = None,
) -> Iterator[Capture]:
    """Context manager recording every connection call of ``model`` (see the module docstring).

    Args:
        matrices: record ``conn.matrix(H)`` (per token) for dynamic kinds, ``conn.matrix()`` for static ones.
        inputs / outputs: record the branch input ``h_in^k`` / the branch output ``T^k`` per token.
        token_index: keep only these flattened token positions (same for every sublayer).
    """
    capture = Capture()
    conns = find_connections(model)

    def take(x: torch.Tensor, trailing: int) -> torch.Tensor:
        x = x.detach().flatten(0, x.dim() - trailing - 1) if x.dim() > trailing else x.detach().reshape(1, *x.shape)
        return x if token_index is None else x[token_index.to(x.device)]

    def wrap(name: str, conn: Connection) -> tuple[Callable, Callable]:
        width, depth = conn.width, conn.depth  # the bound class methods

        def width_wrapper(H: torch.Tensor):
            h_in, ctx = width(H)
            tokens = H.shape[:-2].numel() if token_index is None else token_index.numel()
            call = ConnectionCall(name, conn, num_tokens=tokens)
            if matrices:
                with torch.no_grad():
                    m = conn.matrix(H) if conn.dynamic else conn.matrix()
                call.matrix = take(m, 2).float() if conn.dynamic else m.float().unsqueeze(0)
            if inputs:
                call.h_in = take(h_in, 1).float()
            capture.calls.append(call)
            return h_in, ctx

        def depth_wrapper(y: torch.Tensor, ctx):
            if outputs:
                # The most recent width call of this connection is the one this output belongs to.
                for call in reversed(capture.calls):
                    if call.module is conn:
                        call.output = take(y, 1).float()
                        break
            return depth(y, ctx)

        return width_wrapper, depth_wrapper

    try:
        for name, conn in conns.items():
            w, d = wrap(name, conn)
            conn.width = w  # instance attributes shadow the methods; forward() calls self.width / self.depth
            conn.depth = d
        yield capture
    finally:
        for conn in conns.values():
            conn.__dict__.pop("width", None)
            conn.__dict__.pop("depth", None)


def _chunks(images: Any, batch_size: Optional[int]) -> Iterator[Any]:
    if batch_size is None or not isinstance(images, torch.Tensor):
        yield images
        return
    for s in range(0, images.shape[0], batch_size):
        yield images[s:s + batch_size]


def captured_chunks(
    model: nn.Module,
    images: Any,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    batch_size: Optional[int] = None,
    **capture_options: Any,
) -> Iterator[tuple[Any, Capture]]:
    """Run ``forward(model, chunk)`` in eval mode for each ``batch_size`` chunk of ``images`` and yield
    ``(chunk, capture)``; the model's training mode is restored afterwards, also after an error.

    ``capture_options`` go to :func:`capture_connections`. A forward pass that calls no connection raises
    ``ValueError``.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    forward = forward or default_forward
    was_training = model.training
    model.eval()
    try:
        for chunk in _chunks(images, batch_size):
            with capture_connections(model, **capture_options) as cap:
                forward(model, chunk)
            if not cap.calls:
                raise ValueError("the forward pass called no connection; check the forward= argument")
            yield chunk, cap
    finally:
        model.train(was_training)
