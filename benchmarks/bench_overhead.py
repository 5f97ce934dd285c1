#!/usr/bin/env python
"""Overhead of every connection kind vs the residual twin: step time, activation bytes, peak memory, compile.

Measured in one run, variants interleaved round-robin (the start rotates every round) so that machine noise hits all of
them alike; step time is the median over ``--repeats`` rounds. Workloads:

* ViT-S/16 (``vit_small_patch16_224_*``), batch 8, 224 px: 197 tokens, depth 12, C = 384;
* DiT-B/4 (``dit_b_4_*``), batch 8, 32x32x4 latents: 64 tokens, depth 12, C = 768 (when ``hcvision.models.dit`` exists).

Columns (ratios are vs the ``_res`` model built by the same code; ``peer`` is the public ``hyper-connections`` package
wrapped around the *same* timm backbone, streams folded into the batch as that package does):

* step: forward + backward of one training step (grads set to None before it, no optimizer step);
* act: bytes saved for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` (storages deduplicated,
  parameters and the input batch excluded);
* peak: peak of the torch CPU allocator during one step above its level at the start, from the profiler's
  ``[memory]`` events (sees every tensor allocation through c10's CPU allocator, including temporaries that are never
  saved; does not see malloc outside torch, e.g. oneDNN scratch or Python objects);
* compiled: the same step with ``torch.compile(model)`` (compiled once, warmed up), ratio vs compiled residual;
* ``--recompute``: each HC variant also as ``{variant}+rc``, built with ``connection_options=dict(recompute=True)``
  (streams and mixing recomputed in backward; ``hcvision/connections/recompute.py``, mHC Sec. 4.3.2 / Eq. 20);
* ``--activations-only``: only the saved-byte count (exact, independent of machine load), with a breakdown by the
  shape of each kept storage (``saved_by_shape`` in the JSON); ``--peak`` adds the allocator peak of one step.

    python benchmarks/bench_overhead.py                      # full run (long: compiles every model)
    python benchmarks/bench_overhead.py --quick              # small batch, few repeats, no compile
    python benchmarks/bench_overhead.py --models vit --variants res,shc4,dhc4 --repeats 7 --out bench.json
    python benchmarks/bench_overhead.py --models vit --activations-only --recompute   # act bytes, with and without
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402

import hcvision.models.vit  # noqa: E402,F401  (registers the ViT names)
from hcvision.io import atomic_write  # noqa: E402

try:  # the DiT family may not exist yet
    import hcvision.models.dit  # noqa: F401

    HAVE_DIT = True
except ImportError:
    HAVE_DIT = False

try:
    import hyper_connections as peer

    HAVE_PEER = True
except ImportError:
    peer = None
    HAVE_PEER = False

VARIANTS = ["res"] + [f"{k}{n}" for k in ("shc", "dhc", "sfc", "dfc", "mhc") for n in (2, 4)]


# ---------------------------------------------------------------------------------------------------------------
# Peer models: the public hyper-connections package around the same backbone
# ---------------------------------------------------------------------------------------------------------------
def peer_name(variant: str) -> str | None:
    """The peer model at the same n: its HC is always dynamic (tanh), so shc/dhc both map to it."""
    if variant == "res":
        return "peer_res"
    kind, n = variant[:3], int(variant[3:])
    return {"shc": f"peer_hc{n}", "dhc": f"peer_hc{n}", "sfc": f"peer_fc{n}", "dfc": f"peer_fc{n}",
            "mhc": f"peer_mhc{n}"}[kind]


def _peer_connections(name: str, dim: int, count: int):
    """(list of peer connection modules, expand, reduce) for ``peer_res / peer_hc{n} / peer_fc{m} / peer_mhc{n}``."""
    kind = name[len("peer_"):]
    if kind == "res":
        conns = [peer.Residual() for _ in range(count)]
        streams = 1
    elif kind.startswith("hc"):
        streams = int(kind[2:])
        conns = [peer.HyperConnections(streams, dim=dim, layer_index=k) for k in range(count)]
    elif kind.startswith("fc"):
        streams, fracs = 1, int(kind[2:])
        conns = [peer.HyperConnections(1, dim=dim, layer_index=k, num_fracs=fracs) for k in range(count)]
    elif kind.startswith("mhc"):
        streams = int(kind[3:])
        conns = [peer.ManifoldConstrainedHyperConnections(streams, dim=dim, layer_index=k) for k in range(count)]
    else:
        raise ValueError(f"unknown peer model {name!r}")
    expand, reduce = peer.get_expand_reduce_stream_functions(streams, disable=streams == 1)
    return conns, expand, reduce


class PeerViT(nn.Module):
    """Our residual ViT's patch embedding, blocks' branches and head, with the peer's connections around each branch."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base = base
        conns, self.expand, self.reduce = _peer_connections(name, base.embed_dim, 2 * len(base.blocks))
        self.conns = nn.ModuleList(conns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(self.base._embed(x))
        for i, blk in enumerate(self.base.blocks):
            for conn, branch in ((self.conns[2 * i], blk.attn_branch), (self.conns[2 * i + 1], blk.mlp_branch)):
                branch_input, add_residual = conn(h)
                h = add_residual(branch(branch_input))
        return self.base.forward_head(self.base.norm(self.reduce(h)))


class PeerDiT(nn.Module):
    """Our residual DiT's embedders, blocks' adaLN branches and final layer, with the peer's connections around them."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base = base
        dim = base.blocks[0].attn_conn.dim
        conns, self.expand, self.reduce = _peer_connections(name, dim, 2 * len(base.blocks))
        self.conns = nn.ModuleList(conns)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.base
        t, y = b._check_inputs(x, t, y)
        h = self.expand(b.x_embedder(x) + b.pos_embed.to(x.dtype))
        c = b.t_embedder(t) + b.y_embedder(y)
        for i, blk in enumerate(b.blocks):
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = blk.adaLN_modulation(c).chunk(6, dim=1)
            branch_input, add_residual = self.conns[2 * i](h)
            h = add_residual(blk.attn_branch(branch_input, shift_a, scale_a, gate_a))
            branch_input, add_residual = self.conns[2 * i + 1](h)
            h = add_residual(blk.mlp_branch(branch_input, shift_m, scale_m, gate_m))
        return b.unpatchify(b.final_layer(self.reduce(h), c))


# ---------------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    build: Callable[[str, dict], nn.Module]  # (variant, connection_options) -> model
    batch: Callable[[int], tuple]  # batch size -> inputs
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    build_peer: Callable[[str], nn.Module] | None = None
    notes: list[str] = field(default_factory=list)


def vit_workload() -> Workload:
    def build(variant: str, options: dict) -> nn.Module:
        kw = {"connection_options": options} if options else {}
        return timm.create_model(f"vit_small_patch16_224_{variant}", **kw)

    def batch(b: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        return torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 1000, (b,), generator=g)

    def loss(model: nn.Module, inputs: tuple) -> torch.Tensor:
        x, target = inputs
        return F.cross_entropy(model(x), target)

    def build_peer(name: str) -> nn.Module:
        return PeerViT(timm.create_model("vit_small_patch16_224_res"), name)

    return Workload("ViT-S/16", build, batch, loss, build_peer)


def dit_workload() -> Workload:
    def build(variant: str, options: dict) -> nn.Module:
        kw = {"connection_options": options} if options else {}
        return timm.create_model(f"dit_b_4_{variant}", **kw)

    def batch(b: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(b, 4, 32, 32, generator=g), torch.randint(0, 1000, (b,), generator=g),
                torch.randint(0, 1000, (b,), generator=g))

    def loss(model: nn.Module, inputs: tuple) -> torch.Tensor:
        x, t, y = inputs
        out = model(x, t, y)
        return out.float().pow(2).mean()

    probe = timm.create_model("dit_b_4_res") if HAVE_DIT else None
    can_peer = probe is not None and all(hasattr(probe, a) for a in ("_check_inputs", "x_embedder", "unpatchify")) \
        and hasattr(probe.blocks[0], "attn_branch") and hasattr(probe.blocks[0], "adaLN_modulation")
    wl = Workload("DiT-B/4", build, batch, loss, (lambda name: PeerDiT(timm.create_model("dit_b_4_res"), name))
                  if can_peer else None)
    if not can_peer:
        wl.notes.append("DiT peer columns skipped: the DiT blocks expose no branch split the peer package can wrap")
    return wl


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, wl: Workload, inputs: tuple) -> None:
    for p in model.parameters():
        p.grad = None
    wl.loss(model, inputs).backward()


def saved_activation_bytes(model: nn.Module, wl: Workload, inputs: tuple,
                           breakdown: dict[str, list[int]] | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters and inputs excluded).

    ``breakdown`` (if given) receives ``{storage shape: [count, bytes]}``: each distinct storage once, under the shape
    of the first tensor saved from it (what is kept per sublayer, e.g. ``8x197x4x384`` = the n=4 streams of ViT-S b=8).
    """
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {p.untyped_storage().data_ptr() for p in model.buffers()}
    skip |= {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}
    shapes: dict[int, str] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip and ptr != 0:
                if breakdown is not None and ptr not in seen:
                    shapes[ptr] = "x".join(map(str, t.shape)) + f" {str(t.dtype).replace('torch.', '')}"
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    for p in model.parameters():
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = wl.loss(model, inputs)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    if breakdown is not None:
        for ptr, nbytes in seen.items():
            entry = breakdown.setdefault(shapes[ptr], [0, 0])
            entry[0] += 1
            entry[1] += nbytes
    return sum(seen.values())


def peak_step_bytes(model: nn.Module, wl: Workload, inputs: tuple) -> int | None:
    """Peak of torch's CPU allocations during one train step above the level at its start (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        p.grad = None
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(model, wl, inputs)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception as err:  # profiler unavailable on this build
        print(f"note: peak memory not measured ({err})")
        return None
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() != torch.device("cpu").type and str(e.device_type()).lower().find("cpu") < 0:
            continue
        level += e.nbytes()
        peak = max(peak, level)
    for p in model.parameters():
        p.grad = None
    return peak


def time_interleaved(entries: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(entries)
    for _ in range(warmup):
        for name in names:
            entries[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            entries[name]()
            times[name].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_avg": load,
            "peer": getattr(peer, "__version__", None) if HAVE_PEER else None}


def run_workload(wl: Workload, args: argparse.Namespace) -> dict[str, Any]:
    inputs = wl.batch(args.batch)
    variants = [v for v in args.variants if v in VARIANTS]
    if "res" not in variants:
        variants = ["res"] + variants
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {v: wl.build(v, {}) for v in variants}
    if args.recompute:
        for v in variants:
            if v != "res":
                opts = {"recompute": True}
                if args.recompute_every:
                    opts["recompute_every"] = args.recompute_every
                models[f"{v}+rc"] = wl.build(v, opts)
    if args.peer and HAVE_PEER and wl.build_peer is not None:
        for name in dict.fromkeys(peer_name(v) for v in variants):
            models[name] = wl.build_peer(name)
    elif args.peer and not HAVE_PEER:
        wl.notes.append("peer columns skipped: the hyper-connections package is not installed "
                        "(pip install --no-deps hyper-connections einops)")
    for m in models.values():
        m.train()

    entries = {name: (lambda m=m: train_step(m, wl, inputs)) for name, m in models.items()}
    compiled: dict[str, nn.Module] = {}
    if args.activations_only:
        result = {"workload": wl.name, "batch": args.batch, "notes": wl.notes, "entries": {}}
        for name, m in models.items():
            breakdown: dict[str, list[int]] = {}
            act = saved_activation_bytes(m, wl, inputs, breakdown)
            peak = peak_step_bytes(m, wl, inputs) if args.peak else None
            result["entries"][name] = {"act_bytes": act, "peak_bytes": peak, "saved_by_shape": dict(sorted(
                breakdown.items(), key=lambda kv: -kv[1][1]))}
            print(f"  {name:12s} act {act / 2**20:8.1f} MiB" + (f"  peak {peak / 2**20:8.1f} MiB" if peak else ""),
                  flush=True)
        del models, entries
        gc.collect()
        return result
    if args.compile:
        for v in [v for v in variants if args.compile_variants is None or v in args.compile_variants]:
            t0 = time.perf_counter()
            compiled[v] = torch.compile(models[v], fullgraph=args.fullgraph)
            try:
                train_step(compiled[v], wl, inputs)
                train_step(compiled[v], wl, inputs)
            except Exception as err:
                print(f"note: torch.compile failed for {wl.name} {v}: {type(err).__name__}: {str(err)[:300]}")
                del compiled[v]
                continue
            print(f"  compiled {wl.name} {v} in {time.perf_counter() - t0:.0f}s", flush=True)
            entries[f"{v}@compile"] = lambda m=compiled[v]: train_step(m, wl, inputs)

    print(f"[{wl.name}] timing {len(entries)} entries x {args.repeats} rounds (load {os.getloadavg()[0]:.1f})",
          flush=True)
    times = time_interleaved(entries, args.repeats, args.warmup)

    act: dict[str, int] = {}
    peak: dict[str, int | None] = {}
    if args.memory:
        for name, m in models.items():
            act[name] = saved_activation_bytes(m, wl, inputs)
            peak[name] = peak_step_bytes(m, wl, inputs)

    result = {"workload": wl.name, "batch": args.batch, "notes": wl.notes, "entries": {}}
    for name, ts in times.items():
        result["entries"][name] = {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts,
                                   "act_bytes": act.get(name), "peak_bytes": peak.get(name)}
    del models, compiled, entries
    gc.collect()
    return result


def _ratio(a: float | None, b: float | None, fmt: str = "{:.3f}") -> str:
    if a is None or b is None or b == 0:
        return "-"
    return fmt.format(a / b)


def markdown_activations(result: dict[str, Any], variants: list[str]) -> str:
    """README table of saved activation bytes, without and with recompute, vs the residual twin."""
    e = result["entries"]
    base = e["res"]["act_bytes"]
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    peak = any(x.get("peak_bytes") for x in e.values())
    lines = [f"**{result['workload']}**, batch {result['batch']}: bytes saved for backward (exact count)", "",
             "| variant | act MiB | act ×res | act MiB (recompute) | act ×res (recompute) |"
             + (" peak ×res | peak ×res (recompute) |" if peak else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if peak else "")]
    for v in variants:
        if v not in e:
            continue
        rc = e.get(f"{v}+rc", {}).get("act_bytes")
        row = (f"| {v} | {mib(e[v]['act_bytes'])} | {_ratio(e[v]['act_bytes'], base)} | {mib(rc)} "
               f"| {_ratio(rc, base)} |")
        if peak:
            rp = e.get(f"{v}+rc", {}).get("peak_bytes")
            res_peak = e["res"].get("peak_bytes")
            row += f" {_ratio(e[v].get('peak_bytes'), res_peak)} | {_ratio(rp, res_peak)} |"
        lines.append(row)
    return "\n".join(lines)


def markdown(result: dict[str, Any], variants: list[str], recompute: bool) -> str:
    if "median_s" not in result["entries"].get("res", {}):
        return markdown_activations(result, variants)
    e = result["entries"]
    med = lambda k: e[k]["median_s"] if k in e else None  # noqa: E731
    base, base_c = med("res"), med("res@compile")
    lines = [f"**{result['workload']}**, batch {result['batch']} (step = forward + backward, median)", "",
             "| variant | step ms | step ×res | compiled ×res | compiled/eager | act ×res | peak ×res "
             "| peer step ×peer-res | ours/peer step |"
             + (" act ×res (recompute) | step ×res (recompute) |" if recompute else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if recompute else "")]
    pres = med("peer_res")
    for v in variants:
        if v not in e:
            continue
        pn = peer_name(v) if v != "res" else "peer_res"
        row = [v, f"{1e3 * med(v):.0f}", _ratio(med(v), base), _ratio(med(f"{v}@compile"), base_c),
               _ratio(med(f"{v}@compile"), med(v)), _ratio(e[v]["act_bytes"], e["res"]["act_bytes"]),
               _ratio(e[v]["peak_bytes"], e["res"]["peak_bytes"]),
               f"{_ratio(med(pn), pres)} ({pn})" if pn in e else "-",
               _ratio(med(v), med(pn)) if pn in e else "-"]
        if recompute:
            rc = f"{v}+rc"
            row += [_ratio(e[rc]["act_bytes"], e["res"]["act_bytes"]) if rc in e else "-",
                    _ratio(med(rc), base) if rc in e else "-"]
        lines.append("| " + " | ".join(row) + " |")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,dit", help="comma list of: vit, dit")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, loaded machine 2 OpenMP threads thrash, a step "
                         "took ~10x longer; 0 keeps torch's default)")
    ap.add_argument("--quick", action="store_true", help="batch 2, 3 repeats, 1 warm-up, no compile")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-variants", help="compile only these variants (comma list; default: all timed ones)")
    ap.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True): fail on graph breaks")
    ap.add_argument("--no-peer", dest="peer", action="store_false")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--recompute", action="store_true", help="also time/measure connection_options={'recompute': True}")
    ap.add_argument("--recompute-every", type=int, default=0,
                    help="with --recompute: sublayers per stored segment input (L_r of mHC Eq. 20; 0 = the default)")
    ap.add_argument("--activations-only", action="store_true",
                    help="only count saved activation bytes (exact, load-independent; no timing, peak or compile)")
    ap.add_argument("--peak", action="store_true",
                    help="with --activations-only: also measure the allocator peak of one step (shows recompute's "
                         "transient segment cache, the n C L_r term of mHC Eq. 20)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup, args.compile = min(args.batch, 2), min(args.repeats, 3), 1, False
    if args.compile_variants:
        args.compile_variants = [v.strip() for v in args.compile_variants.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; accepted: {VARIANTS}")
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()
    print(f"machine: {info}", flush=True)
    if not HAVE_PEER and args.peer:
        print("note: the hyper-connections package is not installed; peer columns are skipped", flush=True)
    results = []
    for key in [m.strip() for m in args.models.split(",") if m.strip()]:
        if key == "vit":
            wl = vit_workload()
        elif key == "dit":
            if not HAVE_DIT:
                print("note: hcvision.models.dit not found; DiT-B/4 skipped", flush=True)
                continue
            wl = dit_workload()
        else:
            ap.error(f"unknown model {key!r}; accepted: vit, dit")
        res = run_workload(wl, args)
        results.append(res)
        print()
        print(markdown(res, ["res"] + [v for v in args.variants if v != "res"], args.recompute), flush=True)
        print()
    info["load_avg_end"] = os.getloadavg()
    if args.out:
        record = {"machine": info, "args": vars(args), "results": results}
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
