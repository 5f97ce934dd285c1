#!/usr/bin/env python
"""One connection around a cheap branch (y = h * w), forward + backward, vs the residual: the connection's own cost.

Shapes default to ViT-S/16 at batch 8 (1576 tokens, C = 384). Interleaved, median of --repeats.

    python benchmarks/bench_connection_micro.py --kinds residual,shc,dhc,sfc,dfc,mhc --rate 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hcvision.connections import build_connection, expand_streams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="residual,shc,dhc,sfc,dfc,mhc")
    ap.add_argument("--rate", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8 * 197)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="also time fused=False (the reference path) per kind")
    ap.add_argument("--options", default="", help="k=v,... passed to build_connection (python literals)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = {}
    for kv in filter(None, args.options.split(",")):
        k, v = kv.split("=")
        opts[k] = eval(v)  # noqa: S307 - local benchmark flag
    x = torch.randn(args.tokens, args.dim)
    w = torch.randn(args.dim, requires_grad=True)
    entries = {}
    specs = [(k, {}) for k in args.kinds.split(",")]
    if args.plain:
        specs += [(k, {"fused": False}) for k in args.kinds.split(",") if k != "residual"]
    for kind, extra in specs:
        rate = 1 if kind == "residual" else args.rate
        conn = build_connection(kind, args.dim, rate, 1, **opts, **extra)
        H0 = expand_streams(x, kind, rate).contiguous().requires_grad_()

        def step(conn=conn, H0=H0):
            H0.grad = None
            out = conn(H0, lambda h: h * w)
            out.backward(torch.ones_like(out))

        entries[kind + ("/plain" if extra else "")] = step
    for f in entries.values():
        f()
        f()
    times = {k: [] for k in entries}
    for r in range(args.repeats):
        for k, f in entries.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["residual"]) if "residual" in times else None
    for k, ts in times.items():
        med = statistics.median(ts)
        extra = f"  (+{1e3 * (med - base):.2f} ms over residual)" if base else ""
        print(f"{k:11s} {1e3 * med:8.2f} ms{extra}")


if __name__ == "__main__":
    main()
