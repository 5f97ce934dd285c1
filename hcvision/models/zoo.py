"""The model-zoo table of the README, generated from the timm registry (``python -m hcvision.models.zoo``).

Every model is built on the meta device, so the counts are exact and cost no memory. One row per architecture,
one column per connection variant: total parameters, and what the connections add to the ``_res`` twin.
"""
from __future__ import annotations

import argparse
from typing import Iterable

import timm
import torch

from ..connections import build_connection, kind_records
from ._registry import connection_variants

__all__ = ["count_parameters", "zoo_rows", "zoo_markdown", "kinds_markdown"]

BEGIN, END = "<!-- zoo:{family}:begin -->", "<!-- zoo:{family}:end -->"


def count_parameters(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _architectures(prefix: str) -> list[str]:
    names = timm.list_models(f"{prefix}*_res")
    return [n[: -len("_res")] for n in names]


def zoo_rows(prefix: str) -> Iterable[tuple[str, list[tuple[int, int]]]]:
    """(architecture, [(params, extra vs _res) per connection variant]) for every registered architecture."""
    for arch in _architectures(prefix):
        base = count_parameters(f"{arch}_res")
        yield arch, [(count, count - base)
                     for count in (count_parameters(f"{arch}_{s}") for s, _, _ in connection_variants())]


def _fmt(params: int, extra: int) -> str:
    total = f"{params / 1e6:.1f}M"
    return total if extra == 0 else f"{total} (+{extra:,})"


def zoo_markdown(prefix: str) -> str:
    variants = connection_variants()
    header = "| architecture | " + " | ".join(s for s, _, _ in variants) + " |"
    rule = "|---" * (len(variants) + 1) + "|"
    lines = [header, rule]
    for arch, cells in zoo_rows(prefix):
        lines.append(f"| `{arch}` | " + " | ".join(_fmt(p, e) for p, e in cells) + " |")
    return "\n".join(lines)


def kinds_markdown(dim: int = 384, rates: Iterable[int] = (2, 4)) -> str:
    """The kinds table of the README's connection API, from the kind table: parameters of one connection at width
    ``dim``, counted by building it on the meta device."""
    rates = tuple(rates)
    lines = ["| kind | what | layout | per token | fast path | "
             + " | ".join(f"params, rate {n}" for n in rates) + " |", "|---" * (5 + len(rates)) + "|"]
    for r in kind_records():
        counts = []
        for n in (rates if r.layout != "single" else (1,)):
            try:
                with torch.device("meta"):
                    conn = build_connection(r.name, dim, n, 0)
                counts.append(f"{sum(p.numel() for p in conn.parameters()):,}")
            except ValueError:  # a rate the kind does not take
                counts.append("—")
        counts += [counts[-1]] * (len(rates) - len(counts))
        lines.append(f"| `{r.name}` | {r.title} | {r.layout} | {'yes' if r.dynamic else 'no'} | "
                     f"{r.family or '—'} | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def main() -> None:
    import hcvision  # noqa: F401  (registers the families)

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="vit", help="name prefix of the family: vit or dit; 'kinds' prints the "
                                                            "connection kinds table (one connection at C = 384)")
    args = parser.parse_args()
    print(BEGIN.format(family=args.family))
    print(kinds_markdown() if args.family == "kinds" else zoo_markdown(args.family + "_"))
    print(END.format(family=args.family))


if __name__ == "__main__":
    main()
