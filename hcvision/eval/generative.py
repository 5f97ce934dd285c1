"""Command line of the generative evaluation (the library is :mod:`hcvision.eval.metrics`).

::

    python -m hcvision.eval.generative --gen samples.npz --ref ref_stats.npz \
        --inception-weights pt_inception-2015-12-05.pth --sfid --out results.json
    python -m hcvision.eval.generative --ref real_images/ --write-ref-stats ref_stats.npz --sfid \
        --fd-dinov2 --dinov2-weights dinov2_vitl14.safetensors

The results JSON records the metrics and their provenance (:func:`hcvision.eval.provenance_fields`): the number of
samples, the reference's name and SHA-256, each extractor's weights SHA-256, and the sampling fields (objective,
sampler, sampling steps, guidance scale/interval/channels, SDE diffusion norm, EMA) given as options or in
``--provenance FILE``. Every bad input
exits 2 with one line, before any feature is computed or any file written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..cli import UsageError, run_cli
from ..sampling_spec import add_arguments

__all__ = ["build_parser", "main"]

PROG = "python -m hcvision.eval.generative"


def build_parser() -> argparse.ArgumentParser:
    from .metrics import EXTRACTOR_ALIASES, METRICS

    p = argparse.ArgumentParser(
        prog=PROG,
        description="FID / sFID / IS / precision-recall / KID / FD-DINOv2 of generated images (torch-fidelity, "
                    "offline).")
    p.add_argument("--gen", help="generated images: folder, ADM-style .npz (arr_0 uint8 NHWC) or stats .npz")
    p.add_argument("--ref", help="reference images: folder, ADM-style .npz or stats .npz (save_reference_stats)")
    p.add_argument("--out", help="write the results as JSON to this file (atomically); printed to stdout always")
    p.add_argument("--write-ref-stats", metavar="PATH",
                   help="compute statistics of --ref and save them to PATH (.npz); --gen is then optional")
    p.add_argument("--feature-extractor", default="inception-v3-compat", choices=sorted(EXTRACTOR_ALIASES))
    p.add_argument("--inception-weights", metavar="PATH",
                   help="InceptionV3 weights (.pth state dict or .safetensors); default $HCV_INCEPTION_WEIGHTS")
    p.add_argument("--weights", metavar="PATH", help="weights of the chosen feature extractor (any extractor)")
    p.add_argument("--model-name", help="timm model name of the hcv-digits classifier, if its file lacks it")
    p.add_argument("--dinov2-weights", metavar="PATH", help="DINOv2 ViT weights; default $HCV_DINOV2_WEIGHTS")
    p.add_argument("--dinov2-model", help="timm name of the DINOv2 ViT (default: recorded in the file, else "
                                          "vit_large_patch14_dinov2.lvd142m)")
    m = p.add_argument_group("metrics (hcvision.eval.metrics.METRICS)")
    for metric in METRICS.values():  # --no-NAME drops a default metric, --NAME adds another
        flag = metric.name.replace("_", "-")
        m.add_argument(f"--no-{flag}" if metric.default else f"--{flag}", dest=metric.name, default=metric.default,
                       action="store_false" if metric.default else "store_true",
                       help=f"{'skip' if metric.default else 'also'} {metric.help}")
    p.add_argument("--prc-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--verbose", action="store_true")
    g = p.add_argument_group("provenance (copied into the results JSON)")
    g.add_argument("--provenance", metavar="JSON", help="a JSON object with any of objective, the sampling settings "
                   "(sampler, sampling_steps, guidance_scale, ...), ema (e.g. the sampling CLI's record)")
    g.add_argument("--objective")
    add_arguments(g, defaults="default: from --provenance, else not recorded; e.g.")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None)
    return p


def _sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling fields from ``--provenance`` (old names accepted) overridden by explicit options, checked by
    provenance_fields."""
    from ..sampling_spec import renamed, settings_from_args
    from .provenance import SAMPLING_KEYS, SETTING_NAMES, provenance_fields

    fields: dict[str, Any] = {}
    if args.provenance:
        path = Path(args.provenance)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"--provenance file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"--provenance file {str(path)!r} is not readable JSON ({type(err).__name__})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"--provenance file {str(path)!r} must hold a JSON object, got {type(obj).__name__}")
        # old records (steps, cfg_scale, scheduler) name the same settings; the new names win
        old = {renamed(k, "--provenance"): v for k, v in obj.items() if k in ("steps", "cfg_scale", "scheduler")}
        fields = {**old, **{k: obj[k] for k in SAMPLING_KEYS if obj.get(k) is not None}}
    fields.update({key: getattr(args, key) for key in ("objective", "ema") if getattr(args, key) is not None})
    fields.update(settings_from_args(args))  # checked, errors name the option
    sampling = {k: fields.pop(k) for k in SETTING_NAMES if k in fields}
    return provenance_fields(sampling=sampling, **fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m hcvision.eval.generative`` (run through :func:`hcvision.cli.run_cli`)."""
    args = build_parser().parse_args(argv)
    from .features import INCEPTION_EXTRACTOR
    from .metrics import (
        METRICS,
        MetricOptions,
        _canonical_extractor,
        check_output_path,
        evaluate_generative,
        save_reference_stats,
    )
    from .provenance import input_sha256, provenance_fields

    # Options, output paths and provenance first: nothing is computed or written before they pass.
    extractor = _canonical_extractor(args.feature_extractor)
    if args.inception_weights and args.weights and args.inception_weights != args.weights:
        raise UsageError("give either --inception-weights or --weights, not two different files")
    if args.inception_weights and extractor != INCEPTION_EXTRACTOR:
        raise UsageError("--inception-weights only applies to the Inception feature extractor; use --weights")
    if args.write_ref_stats and not args.ref:
        raise UsageError("--write-ref-stats needs --ref (the reference images)")
    if not args.gen and not args.write_ref_stats:
        raise UsageError("--gen is required (unless only --write-ref-stats is requested)")
    if args.out:
        check_output_path(args.out, "--out")
    if args.write_ref_stats:
        check_output_path(args.write_ref_stats, "--write-ref-stats", ".npz")
    if args.out and args.write_ref_stats and Path(args.out).resolve() == Path(args.write_ref_stats).resolve():
        raise UsageError("--out and --write-ref-stats name the same file; give two paths")
    sampling = _sampling_fields(args)
    common = dict(feature_extractor=args.feature_extractor, weights_path=args.inception_weights or args.weights,
                  batch_size=args.batch_size, device=args.device, model_name=args.model_name, verbose=args.verbose,
                  dinov2_weights=args.dinov2_weights, dinov2_model=args.dinov2_model)

    if not args.gen:  # only reference statistics
        stats = save_reference_stats(args.ref, args.write_ref_stats, sfid=args.sfid, fd_dinov2=args.fd_dinov2,
                                     **common)
        print(f"wrote reference statistics of {stats.num_samples} images to {args.write_ref_stats}", file=sys.stderr)
        return 0

    metrics = [name for name in METRICS if getattr(args, name)]
    result = evaluate_generative(args.gen, args.ref, metrics=metrics, options=MetricOptions(prc_k=args.prc_k),
                                 save_ref_stats=args.write_ref_stats, **common)
    if args.write_ref_stats:
        print(f"wrote reference statistics to {args.write_ref_stats}", file=sys.stderr)
    record: dict[str, Any] = {
        "metrics": result.metrics,
        "gen": str(args.gen),
        "ref": None if args.ref is None else str(args.ref),
        "feature_extractor": extractor,
        "prc_k": args.prc_k,
        **provenance_fields(
            num_samples=result.num_samples,
            reference=None if args.ref is None else Path(args.ref).name,
            reference_sha256=None if args.ref is None else input_sha256(args.ref),
            extractors=result.extractors),
        **sampling,
    }
    if result.num_ref_samples is not None:
        record["num_ref_samples"] = result.num_ref_samples
    if args.write_ref_stats:
        record["ref_stats_written"] = str(args.write_ref_stats)
    text = json.dumps(record, indent=2, sort_keys=True)
    print(text)
    if args.out:
        from ..io import write_text

        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
