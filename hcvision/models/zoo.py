"""The model-zoo table of the README, generated from the timm registry (``python -m hcvision.models.zoo``).

Every model is built on the meta device, so the counts are exact and cost no memory. One row per architecture,
one column per connection variant: total parameters, and what the connections add to the ``_res`` twin.
"""
from __future__ import annotations

import argparse
from typing import Iterable

import timm
import torch

from ._registry import CONNECTION_VARIANTS

__all__ = ["count_parameters", "zoo_rows", "zoo_markdown"]

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
        counts = (count_parameters(f"{arch}_{s}") for s, _, _ in CONNECTION_VARIANTS)
        yield arch, [(count, count - base) for count in counts]


def _fmt(params: int, extra: int) -> str:
    total = f"{params / 1e6:.1f}M"
    return total if extra == 0 else f"{total} (+{extra:,})"


def zoo_markdown(prefix: str) -> str:
    header = "| architecture | " + " | ".join(s for s, _, _ in CONNECTION_VARIANTS) + " |"
    rule = "|---" * (len(CONNECTION_VARIANTS) + 1) + "|"
    lines = [header, rule]
    for arch, cells in zoo_rows(prefix):
        lines.append(f"| `{arch}` | " + " | ".join(_fmt(p, e) for p, e in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import hcvision  # noqa: F401  (registers the families)

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="vit", help="name prefix of the family: vit or dit")
    args = parser.parse_args()
    print(BEGIN.format(family=args.family))
    print(zoo_markdown(args.family + "_"))
    print(END.format(family=args.family))


if __name__ == "__main__":
    main()
