"""What the ViT and DiT families share: connection arguments, the two connections of a block, the ``1/sqrt(n)``
output-projection init, the weight-decay exclusions and the registry docstrings.

Both families wrap the two Pre-Norm sublayers of block ``i`` (attention, then MLP) in connections; in the papers'
numbering these are sublayers ``k = 2i`` and ``k = 2i + 1`` (HC Eq. 14 initialises ``A_m = e_{k mod n}``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..connections import (
    Connection,
    build_connection,
    check_kind,
    check_rate,
    kind_record,
    static_connection_parameters,
)

__all__ = ["connection_arguments", "block_connections", "scale_out_projections", "static_parameter_names",
           "variant_title"]


def connection_arguments(connection: str, rate: int, dim: int, tanh: Optional[bool],
                         connection_options: Optional[Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    """Check ``connection``/``rate`` for width ``dim`` and fold the model-level ``tanh`` switch (HC Eqs. 11-13; the
    paper's "w/o tanh" ablation) into the options passed to :func:`build_connection`. Returns (kind, options)."""
    kind = check_kind(connection)
    check_rate(kind, rate, dim)
    options = dict(connection_options or {})
    if tanh is not None:
        options["tanh"] = bool(tanh)
    return kind, options


def block_connections(kind: str, dim: int, rate: int, layer_index: int,
                      options: Dict[str, Any]) -> Tuple[Connection, Connection]:
    """The connections around block ``layer_index``'s attention (sublayer ``2i``) and MLP (sublayer ``2i + 1``)."""
    return (build_connection(kind, dim, rate, 2 * layer_index, **options),
            build_connection(kind, dim, rate, 2 * layer_index + 1, **options))


def scale_out_projections(blocks: Iterable[nn.Module], kind: str, rate: int) -> None:
    """Divide the init of every block's ``attn.proj`` and ``mlp.fc2`` weights by ``sqrt(n)`` for HC kinds.

    HC paper, Sec. 4: the n streams are summed at the read-out, so each branch output is scaled down to keep the
    read-out's init std. Kinds that split the width instead of copying it (FC) keep the init.
    """
    if not kind_record(kind).copies or rate <= 1:
        return
    with torch.no_grad():
        for blk in blocks:
            blk.attn.proj.weight.div_(math.sqrt(rate))
            blk.mlp.fc2.weight.div_(math.sqrt(rate))


def static_parameter_names(model: nn.Module) -> set:
    """Names of the static connection parameters, which the HC paper trains without weight decay (Sec. 4)."""
    static = {id(p) for p in static_connection_parameters(model)}
    return {name for name, p in model.named_parameters() if id(p) in static}


def variant_title(kind: str, rate: int) -> str:
    """E.g. ``dynamic Hyper-Connections (n=2)``; FC kinds count fractions (m), HC kinds streams (n)."""
    return kind_record(kind).variant_title(rate)
