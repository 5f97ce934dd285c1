"""How far each mHC-family kind's H_res is from doubly stochastic, in fp32, for random residual logits.

For each kind and rate, ``--samples`` logit vectors with i.i.d. N(0, s^2) entries (s = the logit scale) go through the
kind's own ``residual_mix`` (mHC: 20 Sinkhorn rounds, or ``--iters``); the table gives the largest
``max(|row sum - 1|, |column sum - 1|, -min entry)`` over the samples. Exact (load-independent) numbers, seeded.

    python benchmarks/doubly_stochastic.py [--samples 4096] [--scales 0.5,1,2,4,8,16]
"""
from __future__ import annotations

import argparse
import sys

import torch

from hcvision.analysis.diagnostics import doubly_stochastic_error
from hcvision.connections import build_connection

KINDS = (("mhc", 2), ("mhc", 4), ("mhclite", 2), ("mhclite", 4), ("kromhc", 2), ("kromhc", 4))


def residue(kind: str, rate: int, scale: float, samples: int, seed: int = 0, **options) -> float:
    """Largest distance from doubly stochastic of ``residual_mix`` over ``samples`` random logit sets (fp32)."""
    conn = build_connection(kind, 8, rate, 0, **options)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, *conn.bias_res.shape, generator=gen) * scale
    with torch.no_grad():
        return doubly_stochastic_error(conn.residual_mix(logits).double()).max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--scales", default="0.5,1,2,4,8,16")
    parser.add_argument("--iters", type=int, default=20, help="mHC's Sinkhorn rounds")
    args = parser.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    print("| kind | " + " | ".join(f"s = {s:g}" for s in scales) + " |")
    print("|---" * (len(scales) + 1) + "|")
    for kind, rate in KINDS:
        options = {"sinkhorn_iters": args.iters} if kind == "mhc" else {}
        cells = [f"{residue(kind, rate, s, args.samples, **options):.1e}" for s in scales]
        print(f"| `{kind}{rate}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
