#!/usr/bin/env python
"""One-shot GPU check (issue 15): correctness of the Triton path, step-time ratios, bandwidth floor, end-to-end runs.

Needs torch, timm and triton (hcvision from this source tree; the peer package ``hyper-connections`` optional). On one
H100/H200-class GPU it is sized to finish in under 8 minutes::

    python benchmarks/gpu_check.py --out gpu_check.json          # or: bash benchmarks/gpu_check.sh

Sections (each printed as a table, all written to one JSON file):

1. **correctness**: every kind at n = 2 and 4, ``backend="triton"`` against ``backend="reference"`` on the device
   (float32, forward and all gradients, max relative error), with and without recompute;
2. **device**: copy bandwidth (``clone`` of 1 GiB, read + write) and the bf16 matmul rate;
3. **timing**: forward + backward in bf16 autocast, interleaved round-robin, median, for ViT-B/16 (batch 128) and
   DiT-XL/2 (batch 32, 32x32x4 latents), every kind at n = 2 and 4 against the residual twin, eager and
   ``torch.compile``, the peer package where installed; peak memory per variant;
4. **bandwidth floor** per kind: the residual step plus the minimum stream bytes a fused implementation must move per
   step over the measured bandwidth. Assumption (stated, not measured): per sublayer a fused connection reads the fp32
   streams twice and writes them once in forward (width read, depth read + write) and does the same in backward, i.e.
   6 passes over ``n c`` fp32 values per token, of which a residual network already moves 6 passes over ``C`` (its
   own stream); the floor is ``1 + 6 (n c - C) 4 B tokens sublayers / bandwidth / residual step``;
5. **end to end**: ``train_cls.py`` and ``train_dit.py`` as subprocesses for a few dozen steps with bf16 mixed
   precision: exit 0, finite loss, weights written.

``--dry-run`` runs every section on tiny shapes on the CPU (the digits models, a handful of steps, ``backend="torch"``
instead of Triton unless ``TRITON_INTERPRET=1``, no compile, no bf16): what ``tests/test_gpu_check.py`` runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hcvision  # noqa: E402,F401  (registers the models)
from hcvision.connections import build_connection, kind_records, stream_shape  # noqa: E402
from hcvision.io import atomic_write  # noqa: E402

KINDS = tuple(r.name for r in kind_records() if r.family is not None)  # the kinds with a fast path to check
RATES = (2, 4)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")


# ---------------------------------------------------------------------------------------------------------------
# 1. correctness
# ---------------------------------------------------------------------------------------------------------------
def check_correctness(device: torch.device, backend: str, dim: int, tokens: tuple[int, int]) -> list[dict]:
    results = []
    for kind in KINDS:
        for rate in RATES:
            for recompute in (False, True):
                opts = dict(recompute=True, recompute_every=2) if recompute else {}
                fast = [build_connection(kind, dim, rate, k, backend=backend, **opts).to(device) for k in range(2)]
                plain = [build_connection(kind, dim, rate, k, backend="reference", **opts).to(device) for k in range(2)]
                gen = torch.Generator().manual_seed(rate)
                for f, p in zip(fast, plain):
                    with torch.no_grad():
                        for q in f.parameters():
                            q.add_((torch.randn(q.shape, generator=gen) * 0.3).to(device))
                    p.load_state_dict(f.state_dict())
                n, c = stream_shape(kind, rate, dim)
                H = torch.randn(*tokens, n, c, generator=gen).to(device).requires_grad_()
                w = (torch.randn(dim, dim, generator=gen) / math.sqrt(dim)).to(device)
                outs, grads = [], []
                for conns in (fast, plain):
                    X = H
                    for conn in conns:
                        X = conn(X, lambda h: F.gelu(F.layer_norm(h, (dim,))) @ w)
                    outs.append(X)
                    params = [q for conn in conns for q in conn.parameters()]
                    grads.append(torch.autograd.grad(X.square().sum(), [H, *params]))
                err = max([_rel(outs[0], outs[1])] + [_rel(a, b) for a, b in zip(*grads)])
                results.append(dict(kind=kind, rate=rate, recompute=recompute, max_rel_err=err, ok=err < 1e-3))
    return results


# ---------------------------------------------------------------------------------------------------------------
# 2. device figures
# ---------------------------------------------------------------------------------------------------------------
def device_figures(device: torch.device, dry: bool) -> dict:
    numel = (1 << 20) if dry else (1 << 28)  # fp32: 4 MiB / 1 GiB
    x = torch.empty(numel, device=device)
    x.clone()
    t = min(_time(lambda: x.clone(), device) for _ in range(3 if dry else 10))
    bandwidth = 2 * x.numel() * 4 / t  # read + write
    m = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    a @ b
    t = min(_time(lambda: a @ b, device) for _ in range(3 if dry else 10))
    return dict(copy_bandwidth_GBps=bandwidth / 1e9, matmul_TFLOPs=2 * m ** 3 / t / 1e12,
                matmul_dtype=str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------------------------
# 3. timing
# ---------------------------------------------------------------------------------------------------------------
def _workloads(dry: bool) -> dict[str, dict]:
    if dry:
        return {"ViT-digits": dict(name="vit_digits_patch2_8_{}", batch=4, kind="vit"),
                "DiT-digits": dict(name="dit_digits_2_{}", batch=4, kind="dit")}
    return {"ViT-B/16": dict(name="vit_base_patch16_224_{}", batch=128, kind="vit"),
            "DiT-XL/2": dict(name="dit_xl_2_{}", batch=32, kind="dit")}


def _inputs(model: torch.nn.Module, kind: str, batch: int, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        size = tuple(model.patch_embed.img_size)
        x = torch.randn(batch, model.patch_embed.proj.in_channels, *size, generator=g)
        return x.to(device), torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    x = torch.randn(batch, model.in_chans, *model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)  # DiT trains on 1000 timesteps
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def _loss(model, kind: str, inputs: tuple) -> torch.Tensor:
    if kind == "vit":
        return F.cross_entropy(model(inputs[0]).float(), inputs[1])
    return model(*inputs).float().pow(2).mean()


def _peer_model(variant: str, wl: dict, device: torch.device):
    try:
        import bench_overhead as bo
    except Exception:  # noqa: BLE001 - the peer columns are optional
        return None
    if bo.peer is None:
        return None
    name = bo.peer_name(variant)
    base = timm.create_model(wl["name"].format("res"))
    cls = bo.PeerViT if wl["kind"] == "vit" else bo.PeerDiT
    try:
        return cls(base, name).to(device)
    except Exception:  # noqa: BLE001
        return None


def time_models(device: torch.device, dry: bool, compile_: bool, rounds: int, steps: int) -> list[dict]:
    variants = ["res"] + [f"{k}{n}" for k in KINDS for n in RATES]
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=not dry)
    out = []
    for title, wl in _workloads(dry).items():
        entries: dict[str, dict] = {}
        for v in variants:
            for mode in ("eager", "compiled") if compile_ else ("eager",):
                entries[f"{v}/{mode}"] = dict(variant=v, mode=mode, build=lambda v=v: timm.create_model(
                    wl["name"].format(v)).to(device))
            peer = _peer_model(v, wl, device) if not dry or v in ("res", "shc2") else None
            if peer is not None:
                entries[f"peer-{v}/eager"] = dict(variant=f"peer-{v}", mode="eager", build=lambda p=peer: p)
        for key, e in entries.items():  # build, warm up (compile happens here) and record peak memory
            model = e["build"]()
            model.train()
            fn = torch.compile(model) if e["mode"] == "compiled" else model
            inputs = _inputs(model if not hasattr(model, "base") else model.base, wl["kind"], wl["batch"], device)

            def step(fn=fn, inputs=inputs):
                with torch.autocast(**autocast):
                    loss = _loss(fn, wl["kind"], inputs)
                loss.backward()
                return loss

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loss = step()
            e.update(fn=step, times=[], finite=bool(torch.isfinite(loss).item()),
                     peak_MiB=torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None)
        for _ in range(rounds):  # interleaved round-robin
            for e in entries.values():
                e["times"].append(_time(lambda e=e: [e["fn"]() for _ in range(steps)], device) / steps)
        res = {m: statistics.median(entries[f"res/{m}"]["times"]) for m in ("eager", "compiled")
               if f"res/{m}" in entries}
        peer_res = entries.get("peer-res/eager")
        for key, e in entries.items():
            med = statistics.median(e["times"])
            base = statistics.median(peer_res["times"]) if key.startswith("peer-") and peer_res else res[e["mode"]]
            out.append(dict(workload=title, variant=e["variant"], mode=e["mode"], step_ms=med * 1e3,
                            ratio=med / base, finite=e["finite"], peak_MiB=e["peak_MiB"]))
    return out


def floors(timing: list[dict], device_info: dict, dry: bool) -> list[dict]:
    """Bandwidth floor per kind and its overhead against the measured one (see the module docstring)."""
    rows = []
    for title, wl in _workloads(dry).items():
        model = timm.create_model(wl["name"].format("res"), pretrained=False)
        dim = model.embed_dim if hasattr(model, "embed_dim") else model.blocks[0].attn_conn.dim
        with torch.no_grad():
            inputs = _inputs(model, wl["kind"], 1, torch.device("cpu"))
            if wl["kind"] == "vit":
                tokens_per_image = (inputs[0].shape[-1] // model.patch_embed.patch_size[0]) ** 2 + 1
            else:
                tokens_per_image = (model.input_size[0] // model.patch_size) ** 2
        sublayers = 2 * len(model.blocks)
        tokens = tokens_per_image * wl["batch"]
        res = next((r for r in timing if r["workload"] == title and r["variant"] == "res" and r["mode"] == "eager"),
                   None)
        if res is None:
            continue
        for kind in KINDS:
            for n in RATES:
                _, c = stream_shape(kind, n, dim)
                extra = 6 * (n * c - dim) * 4 * tokens * sublayers / (device_info["copy_bandwidth_GBps"] * 1e9)
                floor = 1.0 + extra / (res["step_ms"] / 1e3)
                row = dict(workload=title, variant=f"{kind}{n}", floor_ratio=floor)
                for r in timing:
                    if r["workload"] == title and r["variant"] == f"{kind}{n}":
                        row[f"{r['mode']}_ratio"] = r["ratio"]
                        # FC streams are as wide as the residual stream: no stream bytes above it, no ratio
                        if floor - 1.0 > 1e-6:
                            row[f"{r['mode']}_overhead_vs_floor"] = (r["ratio"] - 1.0) / (floor - 1.0)
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 5. end to end
# ---------------------------------------------------------------------------------------------------------------
def end_to_end(dry: bool, workdir: Path) -> list[dict]:
    steps = 3 if dry else 40
    precision = [] if dry else ["mixed_precision=bf16"]  # the default is fp32 ("no")
    runs = {
        "train_cls.py": ["model=vit_digits_patch2_8_dhc2", "epochs=1", f"max_steps={steps}", "global_batch_size=16",
                         "log_every=1", "progress_bar=false", "tensorboard=false", *precision],
        "train_dit.py": ["model=dit_digits_2_shc2", "epochs=1", f"max_steps={steps}", "global_batch_size=16",
                         "eval_samples=0", "log_every=1", "progress_bar=false", "tensorboard=false", *precision],
    }
    out = []
    for script, args in runs.items():
        run_dir = workdir / script.replace(".py", "")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / script), *args, f"output_dir={run_dir}"], cwd=ROOT,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        losses = []  # every logged training loss (metrics.jsonl, one JSON object per line)
        metrics = run_dir / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.exists() else []:
            losses += [v for k, v in _flatten(json.loads(line)).items() if "loss" in k and isinstance(v, (int, float))]
        weights = run_dir / "model.safetensors"
        ok = proc.returncode == 0 and weights.exists() and bool(losses) and all(math.isfinite(v) for v in losses) \
            and (run_dir / "results.json").exists()
        out.append(dict(script=script, rc=proc.returncode, seconds=time.perf_counter() - t0, weights=weights.exists(),
                        losses=losses[:4], ok=ok, tail="" if ok else (proc.stdout[-1500:] + proc.stderr[-1500:])))
    return out


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        flat = {}
        for k, v in d.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix.rstrip("."): d}


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, a handful of steps (for tests)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON file for every figure")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (default 5; dry-run 1)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    ap.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end training runs")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    backend = "triton" if (not dry or interp) else "torch"
    t_start = time.perf_counter()
    report: dict[str, Any] = dict(device=torch.cuda.get_device_name(0) if not dry else "cpu (dry run)",
                                  torch=torch.__version__, backend_checked=backend, dry_run=dry)
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        report["triton"] = None

    report["correctness"] = check_correctness(device, backend, 16 if dry else 256, (2, 3) if dry else (4, 64))
    _print_table(f"Correctness: backend={backend} vs reference (float32, forward and all gradients)",
                 ["kind", "n", "recompute", "max rel err", "ok"],
                 [[r["kind"], r["rate"], r["recompute"], r["max_rel_err"], r["ok"]] for r in report["correctness"]])
    report["device_figures"] = device_figures(device, dry)
    print("\n" + json.dumps(report["device_figures"]))
    rounds = args.rounds or (1 if dry else 5)
    report["timing"] = time_models(device, dry, compile_=not (dry or args.no_compile), rounds=rounds,
                                   steps=1 if dry else 3)
    _print_table("Step time (forward + backward" + ("" if dry else ", bf16 autocast") + "), ratio to the residual twin",
                 ["workload", "variant", "mode", "step ms", "x res", "peak MiB", "finite"],
                 [[r["workload"], r["variant"], r["mode"], r["step_ms"], r["ratio"], r["peak_MiB"] or "-",
                   r["finite"]] for r in report["timing"]])
    report["floor"] = floors(report["timing"], report["device_figures"], dry)
    _print_table("Bandwidth floor per kind (overhead = ratio - 1, against the floor's)",
                 ["workload", "variant", "floor x res", "eager x res", "eager overhead / floor's"],
                 [[r["workload"], r["variant"], r["floor_ratio"], r.get("eager_ratio", "-"),
                   r.get("eager_overhead_vs_floor", "-")] for r in report["floor"]])
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as tmp:
            report["end_to_end"] = end_to_end(dry, Path(tmp))
        _print_table("End to end", ["script", "rc", "seconds", "weights", "losses", "ok"],
                     [[r["script"], r["rc"], r["seconds"], r["weights"], r["losses"], r["ok"]]
                      for r in report["end_to_end"]])
    report["seconds"] = time.perf_counter() - t_start
    ok = all(r["ok"] for r in report["correctness"]) and all(r["finite"] for r in report["timing"]) \
        and all(r["ok"] for r in report.get("end_to_end", []))
    report["ok"] = ok
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    print(f"\n{'OK' if ok else 'FAILED'} in {report['seconds']:.0f} s; figures in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
