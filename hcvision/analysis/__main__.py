"""Command line: analyse a trained classifier's connections and write PNGs plus a JSON of the numbers.

    python -m hcvision.analysis --model vit_digits_patch2_8_dhc2 --checkpoint weights/digits_dhc2.safetensors \\
        --data digits --num-images 256 --out runs/analysis

Writes into ``--out``: ``connection_matrix.png`` (C^(0), HC Fig. 7), ``unfolded.png`` (C^(0) and C^(i), Fig. 13),
``layer_similarity.png`` (Fig. 3), ``weights.png`` (last dynamic connection per class, Fig. 12; dynamic kinds only)
and ``analysis.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..cli import UsageError, run_cli
from ..io import write_json
from ..models.loading import check_model_name, load_model
from ..outputs import check_writable

__all__ = ["main", "analyse", "load_images", "build_model"]


def build_model(name: str, checkpoint: Optional[str]) -> torch.nn.Module:
    """``name`` with the weights of ``checkpoint`` (a weights file or run directory), or its fresh init."""
    import timm

    check_model_name(name, key="--model")
    if checkpoint is None:
        return timm.create_model(name)
    return load_model(checkpoint, model_name=name, ema=False)[0]


def _digits(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The held-out digits split, normalised with the model's cfg mean / std."""
    from ..data import DigitsDataset

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    ds = DigitsDataset("val", cfg.get("mean", (0.5,)), cfg.get("std", (0.5,)))
    return ds.images, ds.targets, [str(i) for i in range(10)]


def _folder(model: torch.nn.Module, root: Path) -> tuple[Any, list[str]]:
    from hcvision.data import SafeImageFolder, build_timm_transform

    if (root / "val").is_dir():
        root = root / "val"
    in_chans = getattr(model, "in_chans", 3)
    ds = SafeImageFolder(root, transform=build_timm_transform(model, is_training=False), in_chans=in_chans)
    return ds, list(ds.classes)


def load_images(model: torch.nn.Module, data: str, num_images: int, seed: int = 0):
    """``(images, labels, class_names)``: ``num_images`` samples drawn with ``seed`` from digits or an ImageFolder."""
    if num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {num_images}")
    gen = torch.Generator().manual_seed(seed)
    if data == "digits":
        images, labels, names = _digits(model)
        idx = torch.randperm(len(labels), generator=gen)[:num_images]
        return images[idx], labels[idx], names
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data {data!r} is neither 'digits' nor a folder; accepted: digits, or an ImageFolder "
                         "directory (DIR/<class>/<image> or DIR/val/<class>/<image>)")
    ds, names = _folder(model, root)
    idx = torch.randperm(len(ds), generator=gen)[:num_images].tolist()
    samples = [ds[i] for i in idx]
    samples = [s for s in samples if s is not None]
    if not samples:
        raise UsageError(f"no readable images in {data!r}")
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]), names


def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes {text!r} is not valid; accepted: comma-separated class indices, e.g. 0,3,7"
                         ) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hcvision.analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="timm model name, e.g. vit_digits_patch2_8_dhc2")
    p.add_argument("--checkpoint", default=None, help="safetensors weights (default: the fresh init)")
    p.add_argument("--data", default="digits", help="'digits' (embedded) or an ImageFolder directory")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--classes", default=None,
                   help="classes for the weight distributions (default: 3 drawn with --seed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch for dynamic unfolding (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def analyse(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the analysis the command line describes; returns the report written to ``analysis.json``."""
    from . import (
        connection_matrix,
        connection_weights,
        layer_similarity,
        plot_connection_matrix,
        plot_layer_similarity,
        plot_unfolded,
        plot_weight_distributions,
    )

    args = parse_args(argv)
    check_writable(args.out, "--out")
    torch.manual_seed(args.seed)
    classes = _parse_classes(args.classes)
    model = build_model(args.model, args.checkpoint).eval()
    images, labels, names = load_images(model, args.data, args.num_images, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.model + ("" if args.checkpoint else " (init)")

    cm = connection_matrix(model, images, batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed)
    files = [plot_connection_matrix(cm, out / "connection_matrix.png", title=f"$C^{{(0)}}$ {label}"),
             plot_unfolded(cm, out / "unfolded.png", title=label)]
    sim = layer_similarity(model, images, batch_size=args.batch_size)
    files.append(plot_layer_similarity({label: sim}, out / "layer_similarity.png"))
    weights = None
    if cm.dynamic:
        present = sorted(set(labels.tolist()))
        if classes is None:
            pick = torch.randperm(len(present), generator=torch.Generator().manual_seed(args.seed))[:3]
            classes = sorted(present[i] for i in pick.tolist())
        dist = connection_weights(model, images, labels, classes=classes, batch_size=args.batch_size,
                                  class_names=dict(enumerate(names)))
        files.append(plot_weight_distributions(dist, out / "weights.png", title=f"{dist.layer_name} of {label}"))
        weights = dist.summary()
    report = {
        "model": args.model, "checkpoint": args.checkpoint, "data": args.data, "num_images": int(len(labels)),
        "seed": args.seed, "connection_matrix": cm.to_dict(), "layer_similarity": sim.to_dict(),
        "weights": weights, "files": [p.name for p in files] + ["analysis.json"],
    }
    write_json(out / "analysis.json", report)
    print(f"wrote {', '.join(report['files'])} to {out}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    analyse(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m hcvision.analysis"))
