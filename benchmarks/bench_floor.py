#!/usr/bin/env python
"""Where the step-time overhead of a connection goes, measured against the budget each target of issue 7 allows.

All at ViT-S/16 training shapes (batch 8: M = 1576 tokens, C = 384, 12 blocks = 24 sublayers), one thread, interleaved
round-robin, medians. Units: ``copy`` is the time of one copy of the n-stream tensor (M, n, C) (``torch.clone``: one
read and one write of the streams, the cheapest thing that touches them), measured in the same run.

1. the residual model's step, and per target the extra time one sublayer may take: ``(target - 1) * step / 24``;
2. the primitives a connection is built from, at these shapes, in ms and in copies;
3. each connection kind's own cost (forward + backward around a trivial branch, minus the residual's), the step
   ratio it implies (``1 + 24 * extra / step``), and the ratio of a hypothetical fused kernel that only moves the bytes
   a sublayer must move (read H twice and write H' in forward; read G, H, write grad H in backward: ~3 copies).

    python benchmarks/bench_floor.py [--rate 4] [--repeats 15] [--no-compile] [--out floor.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_overhead import machine_info, time_interleaved, vit_workload  # noqa: E402

from hcvision.connections import build_connection, expand_streams  # noqa: E402
from hcvision.connections.kernels import cpu_loops as _kernels  # noqa: E402
from hcvision.io import atomic_write  # noqa: E402

TARGETS = {"shc": 1.08, "dhc": 1.10, "dfc": 1.08, "mhc": 1.15}  # issue 7, ViT-S/16 b = 8, n = 4
FUSED_FLOOR_COPIES = 3.0  # forward: read H twice, write H'; backward: read G and H, write grad H (each ~1/2 copy)


def primitives(M: int, n: int, C: int, compile_mix: bool) -> dict[str, callable]:
    """The tensor ops the eager connection paths are made of, at (M, n, C)."""
    g = torch.Generator().manual_seed(0)
    H = torch.randn(M, n, C, generator=g)
    G = torch.randn(M, n + 1, C, generator=g)
    y = torch.randn(M, 1, C, generator=g)
    h = torch.randn(M, C, generator=g)
    mix = torch.randn(n, n + 1, generator=g)
    mix_t = mix.t().contiguous()
    beta = torch.randn(n, 1, generator=g)
    W = torch.randn(n + 2, C, generator=g)  # a DHC projection (k + n + 1 rows), row-major
    W_cm = W.t().contiguous()  # the same weight column-major
    Hf = H.view(-1, C)
    gp = torch.randn(M * n, n + 2, generator=g)
    ops = {
        "copy of the streams (M, n, C)": lambda: H.clone(),
        "copy of a hidden state (M, C)": lambda: h.clone(),
        "mix [h_in | R] = A^T H (bmm, 1 + n outputs; the fallback)": lambda: torch.bmm(mix_t.expand(M, n + 1, n), H),
        "grad H = A [g_in; g_R] (bmm)": lambda: torch.bmm(mix.expand(M, n, n + 1), G),
        "grad A = H [g_in; g_R]^T (bmm)": lambda: torch.bmm(H, G.transpose(1, 2)),
        "cat [g_in; g_R]": lambda: torch.cat([y, H], dim=1),
        "depth H' = R + B y (addcmul)": lambda: torch.addcmul(H, beta, y),
        "depth grads B^T G and G y^T (2 bmm)": lambda: (torch.bmm(beta.t().expand(M, 1, n), H),
                                                       torch.bmm(H, y.transpose(1, 2))),
        "projection H W (row-major W, as used)": lambda: torch.mm(Hf, W.t()),
        "projection H W (column-major W)": lambda: torch.mm(Hf, W_cm),
        "projection weight grad g^T H (as used)": lambda: torch.mm(gp.t(), Hf),
        "projection weight grad H^T g": lambda: torch.mm(Hf.t(), gp),
        "torch.var_mean over C (not used)": lambda: torch.var_mean(H, dim=-1, correction=0),
        "E[x^2] and E[x] over C (as used)": lambda: (torch.linalg.vector_norm(Hf, dim=-1), Hf.mean(-1)),
    }
    # the CPU loops the eager path uses (connections/kernels/cpu_loops.py, HCV_CPU_KERNELS=build)
    if _kernels.available(H, mix):
        ops["mix as the CPU loop (as used)"] = lambda: _kernels.mix_forward(H, mix)
        ops["mix backward: grad H and grad A in one CPU loop (as used)"] = lambda: _kernels.mix_backward(
            H, mix, y, H, need_H=True, need_mix=True)
        ops["depth backward: grad y and grad B in one CPU loop (as used)"] = lambda: _kernels.depth_backward(
            H, beta, y, need_y=True, need_beta=True)
    if compile_mix:
        try:  # the same mix as one generated loop (what a fused kernel would do), if inductor works here
            loop = torch.compile(lambda H, m: (m[:, :, None] * H[:, :, None, :]).sum(1), dynamic=False)
            torch.testing.assert_close(loop(H, mix), torch.bmm(mix_t.expand(M, n + 1, n), H), rtol=1e-4, atol=1e-4)
            ops["mix as an inductor-generated loop"] = lambda: loop(H, mix)
        except Exception as err:  # noqa: BLE001 - report and go on: the column is optional
            print(f"note: inductor mix skipped ({type(err).__name__}: {err})", flush=True)
    return ops


def connection_steps(M: int, C: int, rate: int, kinds: list[str]) -> dict[str, callable]:
    """Forward + backward of one connection around ``y = h * w`` (the branch's own cost is the same for every kind)."""
    x = torch.randn(M, C)
    w = torch.randn(C, requires_grad=True)
    steps = {}
    for kind in ["residual", *kinds]:
        conn = build_connection(kind, C, 1 if kind == "residual" else rate, layer_index=1)
        H0 = expand_streams(x, kind, conn.rate).contiguous().requires_grad_()

        def step(conn=conn, H0=H0):
            H0.grad = None
            out = conn(H0, lambda h: h * w)
            out.backward(torch.ones_like(out))

        steps[kind] = step
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--step-repeats", type=int, default=3, help="rounds for the residual model's step")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the inductor mix column")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    M, C, sublayers, n = 8 * 197, 384, 24, args.rate

    wl = vit_workload()
    model, inputs = wl.build("res", {}), wl.batch(8)

    def res_step():
        model.zero_grad(set_to_none=True)
        wl.loss(model, inputs).backward()

    step_ms = 1e3 * statistics.median(time_interleaved({"res": res_step}, args.step_repeats, 1)["res"])

    prim = {k: 1e3 * statistics.median(v)
            for k, v in time_interleaved(primitives(M, n, C, args.compile), args.repeats, 2).items()}
    copy_ms = prim["copy of the streams (M, n, C)"]
    kinds = list(TARGETS) + ["sfc"]
    conn = {k: 1e3 * statistics.median(v)
            for k, v in time_interleaved(connection_steps(M, C, n, kinds), args.repeats, 2).items()}

    print(f"ViT-S/16, batch 8, n = {n}, one thread; residual step {step_ms:.0f} ms; one copy of the streams "
          f"{copy_ms:.3f} ms\n")
    print("| primitive | ms | copies |\n|---|---:|---:|")
    for k, v in prim.items():
        print(f"| {k} | {v:.3f} | {v / copy_ms:.1f} |")
    print("\n| kind | target | budget ms / sublayer (copies) | connection extra ms / sublayer (copies) | "
          f"implied step ×res | fused floor ({FUSED_FLOOR_COPIES:g} copies per sublayer) ×res |\n"
          "|---|---:|---:|---:|---:|---:|")
    floor = 1 + sublayers * FUSED_FLOOR_COPIES * copy_ms / step_ms
    rows = {}
    for kind in kinds:
        extra = conn[kind] - conn["residual"]
        target = TARGETS.get(kind)
        budget = (target - 1) * step_ms / sublayers if target else None
        implied = 1 + sublayers * extra / step_ms
        rows[kind] = dict(target=target, budget_ms=budget, extra_ms=extra, implied=implied)
        budget_txt = f"{budget:.2f} ({budget / copy_ms:.0f})" if budget else "–"
        print(f"| {kind}{n} | {target or '–'} | {budget_txt} | {extra:.2f} ({extra / copy_ms:.0f}) | {implied:.3f} | "
              f"{floor:.3f} |")
    if args.out:
        record = dict(machine=machine_info(), rate=n, step_ms=step_ms, copy_ms=copy_ms, primitives_ms=prim,
                      connection_ms=conn, kinds=rows, fused_floor=floor)
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
