"""The table of connection kinds: one frozen :class:`KindRecord` per kind, registered next to the kind's class.

Everything that used to spell a kind out reads it from here: :func:`~hcvision.connections.build_connection` and its
option check, the closed-form parameter counts, the stream layout (``expand_streams`` / ``reduce_streams``), the fast
path family a connection asks :mod:`~hcvision.connections.kernels` for, the timm names and titles of the model zoo
(:mod:`hcvision.models._registry`), the kinds ``python -m hcvision.compare --kinds`` accepts and its plot colours.

Adding a kind means one module that defines the class and calls :func:`register`, plus one import line in
``connections/__init__.py`` (and :mod:`~hcvision.connections.kernels` only for a fast path). Model families registered
with timm before a kind is added pick it up at once (:func:`on_register`).

Layouts (see :mod:`hcvision.connections.base`):

* ``single``: one stream, ``rate`` must be 1 (the Pre-Norm residual; named by its tag alone, ``..._res``);
* ``copies``: ``n`` copies of the hidden state, read out by their sum (HC, mHC and its exact variants);
* ``fractions``: the hidden state cut into ``m`` fractions, read out by concatenation (FC).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["KindRecord", "LAYOUTS", "register", "kind_record", "kind_names", "kind_records", "on_register",
           "check_kind"]

LAYOUTS: tuple[str, ...] = ("single", "copies", "fractions")


@dataclass(frozen=True)
class KindRecord:
    """Everything the library needs to know about one connection kind.

    Attributes:
        name: the kind as ``build_connection`` takes it (lower case), e.g. ``"dhc"``.
        title: what the kind is, for docstrings and tables, e.g. ``"dynamic Hyper-Connections"``.
        layout: ``single``, ``copies`` or ``fractions`` (module docstring).
        dynamic: whether the coefficients depend on the input (per token).
        build: ``build(dim, rate, layer_index, **options) -> Connection``; usually the class itself.
        options: the keyword options ``build`` accepts (anything else is refused with the kinds that accept it).
        zoo_rates: the rates registered as timm names (``vit_small_patch16_224_{tag}{n}``); ``(1,)`` for ``single``.
        tag: the stem of the timm-name suffix and of ``compare --kinds`` labels (default: ``name``).
        family: the fast-path family in :mod:`~hcvision.connections.kernels` (``None``: the reference path only).
        extra_parameters: ``(dim, rate, norm_params) -> int``, the closed-form parameter count of one connection
            (``norm_params``: the dynamic norm's parameters, ``None`` for an affine LayerNorm).
        rate_rule: ``(rate) -> None``, raising ``ValueError`` (naming the accepted rates) for a rate this kind cannot
            take beyond the layout's own rules; ``None``: every rate the layout allows.
    """

    name: str
    title: str
    layout: str
    dynamic: bool
    build: Callable[..., Any]
    options: tuple[str, ...] = ()
    zoo_rates: tuple[int, ...] = (2, 4)
    tag: str = ""
    family: Optional[str] = None
    extra_parameters: Optional[Callable[[int, int, Optional[int]], int]] = None
    rate_rule: Optional[Callable[[int], None]] = None

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower() or not self.name.isidentifier():
            raise ValueError(f"a kind's name must be a lower-case identifier, got {self.name!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"kind {self.name!r}: unknown layout {self.layout!r}; accepted: {', '.join(LAYOUTS)}")
        if not self.tag:
            object.__setattr__(self, "tag", self.name)
        if not self.tag.isalpha() or self.tag != self.tag.lower():
            raise ValueError(f"kind {self.name!r}: the tag must be lower-case letters (it is followed by the rate "
                             f"in model names), got {self.tag!r}")
        if self.layout == "single" and tuple(self.zoo_rates) != (1,):
            object.__setattr__(self, "zoo_rates", (1,))
        if self.family is not None:
            from . import kernels

            if self.family not in kernels.FAMILIES:
                raise ValueError(f"kind {self.name!r}: unknown fast-path family {self.family!r}; accepted: "
                                 f"{', '.join(kernels.FAMILIES)} or None (reference path only)")

    # --- layout -----------------------------------------------------------------------------------------------
    @property
    def copies(self) -> bool:
        """n copies of the hidden state, summed on read-out (the HC paper's ``1/sqrt(n)`` output init applies)."""
        return self.layout == "copies"

    @property
    def fractions(self) -> bool:
        """m fractions of the hidden state, concatenated on read-out."""
        return self.layout == "fractions"

    @property
    def rate_symbol(self) -> str:
        """``m`` for fractions, ``n`` for streams (titles: ``dynamic Frac-Connections (m=2)``)."""
        return "m" if self.fractions else "n"

    def stream_shape(self, rate: int, dim: int) -> tuple[int, int]:
        """(number of streams, width of one stream)."""
        return (rate, dim // rate) if self.fractions else (rate, dim)

    def num_inputs(self, rate: int) -> int:
        """Branch-input slots k: one weighted sum for single/copies, one per fraction for fractions."""
        return rate if self.fractions else 1

    def expand(self, x: torch.Tensor, rate: int) -> torch.Tensor:
        """``(..., C) -> (..., n, c)`` as a view (HC Eq. 14's start for copies)."""
        if self.fractions:
            return x.unflatten(-1, (rate, x.shape[-1] // rate))
        return x.unsqueeze(-2).expand(*x.shape[:-1], rate, x.shape[-1])

    def reduce(self, H: torch.Tensor) -> torch.Tensor:
        """``(..., n, c) -> (..., C)``: the streams' sum (copies), their concatenation (fractions) or the stream."""
        if self.fractions:
            return H.flatten(-2)
        if self.layout == "single":
            return H.squeeze(-2)
        return H.sum(dim=-2)

    # --- names ------------------------------------------------------------------------------------------------
    def suffix(self, rate: int) -> str:
        """The timm-name suffix and ``compare --kinds`` label: ``res``, ``dhc2``, ``mhclite4`` ..."""
        return self.tag if self.layout == "single" else f"{self.tag}{rate}"

    def variant_title(self, rate: int) -> str:
        """E.g. ``dynamic Hyper-Connections (n=2)``; ``single`` kinds have no rate to name."""
        return self.title if self.layout == "single" else f"{self.title} ({self.rate_symbol}={rate})"


_RECORDS: dict[str, KindRecord] = {}
_LISTENERS: list[Callable[[KindRecord], None]] = []


def register(record: KindRecord) -> KindRecord:
    """Add ``record`` to the table (once per name and tag) and tell every :func:`on_register` listener."""
    if record.name in _RECORDS:
        raise ValueError(f"connection kind {record.name!r} is already registered")
    clash = [r.name for r in _RECORDS.values() if r.tag == record.tag]
    if clash:
        raise ValueError(f"kind {record.name!r}: tag {record.tag!r} is already used by kind {clash[0]!r}")
    _RECORDS[record.name] = record
    for listener in list(_LISTENERS):
        listener(record)
    return record


def on_register(listener: Callable[[KindRecord], None]) -> None:
    """Call ``listener(record)`` for every kind registered from now on (the timm registry uses this)."""
    _LISTENERS.append(listener)


def kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_RECORDS)


def kind_records() -> tuple[KindRecord, ...]:
    return tuple(_RECORDS.values())


def check_kind(kind: str) -> str:
    """Return ``kind`` lower-cased, or raise ``ValueError`` naming the accepted kinds."""
    if not isinstance(kind, str) or kind.lower() not in _RECORDS:
        close = difflib.get_close_matches(str(kind).lower(), list(_RECORDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown connection kind {kind!r}{hint}; accepted: {', '.join(_RECORDS)}")
    return kind.lower()


def kind_record(kind: str) -> KindRecord:
    """The record of ``kind`` (case-insensitive); ``ValueError`` naming the accepted kinds for an unknown one."""
    return _RECORDS[check_kind(kind)]
