"""Sample a trained (HC-)DiT: class-balanced, reproducible for any number of processes, ADM-compatible output.

    python -m hcvision.sample --checkpoint runs/dit_xl_2_shc2 --num-samples 50000 --out samples/ \\
        --vae /models/sd-vae-ft-ema                          # DiT's evaluation: 250 DDPM steps, cfg 1.5
    python -m hcvision.sample --checkpoint runs/sit_xl_2_repa --num-samples 50000 --out samples/ \\
        --guidance-scale 1.8 --guidance-interval 0 0.7 --diffusion-norm 2   # REPA: flow, 250 SDE steps
    torchrun --nproc_per_node 8 -m hcvision.sample ...       # same files, 8x faster

The objective (``ddpm`` or ``flow``) and the sampling defaults come from the weights file's metadata (written by
``train_dit.py``); command-line options override them. Sample ``i`` has class ``classes[i % len(classes)]`` (all
classes by default) and its own seed ``(seed, i)``: its initial noise and every later noise draw come from a generator
of its own, so the output does not depend on the batch size or the number of processes. Rank ``r`` of ``W`` generates
samples ``r, r + W, r + 2W, ...``; every batch is padded to ``--batch-size`` rows so all forward passes have the same
shape (a row's numbers then do not depend on what else is in the batch, which makes the files bit-identical across
world sizes, not just equal in distribution). The first ``N`` samples are written, no duplicates and no gaps.

Output (``--out``): ``images/000000.png ...``, ``samples.npz`` (``arr_0`` uint8 NHWC as ADM's evaluator reads it,
``arr_1`` the class labels), ``grid.png`` (one row per class) and ``sample_config.json``.
Weights: the EMA weights of a run or checkpoint directory by default (``--raw`` for the trained weights); a
``.safetensors`` or ``.pt`` file (official DiT and diffusers checkpoints too) is used as it is.
Every foreseeable error (missing, unreadable, truncated or non-finite weights, unknown classes, an output path that
cannot be a directory, a missing VAE, ...) exits with status 2 and one line, before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .cli import UsageError, run_cli
from .data.latents import process_state
from .data.vae import VaeUnavailableError
from .diffusion import make_sampler, objective_of, read_sampling_metadata
from .diffusion import sample as diffusion_sample
from .diffusion.guidance import resolve_guidance_channels
from .eval.provenance import provenance_fields
from .io import PathLike, atomic_write, write_json
from .models.loading import load_model
from .outputs import check_writable, run_dir_lock
from .sampling_spec import SamplingSpec, add_arguments, settings_from_args

__all__ = ["class_labels", "decode_to_uint8", "generate", "load_dit", "make_grid", "sample_seed", "sample_to_dir",
           "sample_and_score",
           "main"]

Decoder = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Labels, seeds, pixels
# ------------------------------------------------------------------------------------------------
def class_labels(indices: Sequence[int], num_classes: int, classes: Optional[Sequence[int]] = None) -> Tensor:
    """Class-balanced labels: sample ``i`` gets ``classes[i % len(classes)]`` (default: class ``i % num_classes``)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if classes is None:
        return idx % num_classes
    return torch.as_tensor(list(classes), dtype=torch.long)[idx % len(classes)]


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32).astype(np.uint64)
    return int((state[0] | (state[1] << np.uint64(32))) & np.uint64(2**63 - 1))


def decode_to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1] ``(B, C, H, W)`` -> uint8 NHWC (``round((x + 1) * 127.5)``, clipped)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------
def generate(
    model: torch.nn.Module,
    indices: Sequence[int],
    *,
    sample_shape: Tuple[int, ...],
    num_classes: int,
    null_class: Optional[int],
    sampling: SamplingSpec = SamplingSpec(sampler="ddpm"),
    classes: Optional[Sequence[int]] = None,
    seed: int = 0,
    batch_size: int = 32,
    decode: Optional[Decoder] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> Tuple[np.ndarray, Tensor]:
    """Generate the samples ``indices`` (any subset of ``0..N-1``); returns uint8 NHWC images and their labels.

    Each batch goes through :func:`hcvision.diffusion.sample` with one generator per row, sampled as ``sampling``
    says (its sampler named: ``SamplingSpec.for_objective`` fills in an objective's default; guidance channels 0 =
    automatic). ``decode`` maps model outputs to images in [-1, 1] (:func:`hcvision.data.vae.vae_decoder`);
    ``None`` means pixel space.
    """
    objective_of(sampling.sampler)  # ValueError listing the accepted names
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; expected an integer >= 1")
    if sampling.guidance_scale != 1.0 and null_class is None:
        raise ValueError(f"guidance_scale={sampling.guidance_scale} needs a model trained with label dropout (a null "
                         "class); use guidance_scale=1 for this model")
    guidance_channels = resolve_guidance_channels(sampling.guidance_channels, sample_shape[0])
    device = torch.device(device)
    indices = list(indices)
    labels = class_labels(indices, num_classes, classes)
    images: List[np.ndarray] = []
    batches = range(0, len(indices), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({sampling.sampler}, {sampling.sampling_steps} steps)", unit="batch")
    for b in batches:
        idx = indices[b: b + batch_size]
        padded = idx + [idx[-1]] * (batch_size - len(idx))
        # Pad with copies of the last sample: every forward pass then has the same shape on every rank.
        gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in padded]
        y = class_labels(padded, num_classes, classes).to(device)
        sampler = make_sampler(sampling.sampler, sampling.sampling_steps, device,
                               sde_diffusion_norm=sampling.diffusion_norm)  # fresh: multistep solvers keep state
        x = diffusion_sample(model, (len(padded), *sample_shape), y, scheduler=sampler,
                             guidance_scale=sampling.guidance_scale, guidance_channels=guidance_channels,
                             guidance_interval=sampling.guidance_interval, null_class=null_class, generator=gens,
                             device=device)
        if decode is not None:
            x = decode(x)
        images.append(decode_to_uint8(x[: len(idx)]))
    if not images:
        return np.zeros((0, 0, 0, 0), dtype=np.uint8), labels
    return np.concatenate(images), labels


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def make_grid(images: np.ndarray, labels: Sequence[int], classes: Union[int, Sequence[int]], per_row: int = 10,
              min_cell: int = 32) -> np.ndarray:
    """One row per class that has samples (row ``k`` = the first ``per_row`` samples of its class; ``classes`` gives
    the order, an int ``n`` meaning ``0..n-1``), as many columns as the fullest row (at most ``per_row``), 2-px gaps;
    small images are enlarged by an integer factor (nearest) to at least ``min_cell`` px. 20 samples of 10 classes
    make a 10 x 2 grid, not a mostly blank 10 x 10 one."""
    labels = np.asarray(labels)
    rows = [k for k in (range(classes) if isinstance(classes, int) else classes) if (labels == k).any()]
    per_row = max(1, min(per_row, max((int((labels == k).sum()) for k in rows), default=1)))
    n, h, w, c = images.shape
    f = max(1, math.ceil(min_cell / max(h, w)))
    cell_h, cell_w, gap = h * f, w * f, 2
    grid = np.full((len(rows) * (cell_h + gap) + gap, per_row * (cell_w + gap) + gap, c), 255, dtype=np.uint8)
    for k, cls in enumerate(rows):
        for j, i in enumerate(np.flatnonzero(labels == cls)[:per_row]):
            big = images[i].repeat(f, axis=0).repeat(f, axis=1)
            top, left = gap + k * (cell_h + gap), gap + j * (cell_w + gap)
            grid[top: top + cell_h, left: left + cell_w] = big
    return grid


def sample_to_dir(
    model: torch.nn.Module,
    out_dir: PathLike,
    num_samples: int,
    *,
    state: Any = None,
    write_images: bool = True,
    **generate_kwargs: Any,
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Generate samples ``0..num_samples-1`` across all processes into ``out_dir`` (collective call).

    Rank ``r`` generates ``r::world`` and writes their PNGs; after a barrier rank 0 reads them back in index order
    (PNG is lossless) and writes ``samples.npz`` and ``grid.png``. Returns ``(images, labels)`` on rank 0.
    """
    state = state or process_state()
    out = Path(out_dir)
    img_dir = out / "images"
    if state.is_main_process:
        img_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    mine = list(range(state.process_index, num_samples, state.num_processes))
    progress = bool(generate_kwargs.pop("progress", False)) and state.is_main_process
    images, _ = generate(model, mine, device=state.device, progress=progress, **generate_kwargs)
    for i, arr in zip(mine, images):
        _save_png(arr, img_dir / f"{i:06d}.png")
    state.wait_for_everyone()  # every rank's PNGs are on disk
    result = None
    if state.is_main_process:
        from .eval.npz import save_npz_samples

        classes = generate_kwargs.get("classes")
        num_classes = generate_kwargs["num_classes"]
        all_images = np.stack([_read_png(img_dir / f"{i:06d}.png") for i in range(num_samples)])
        labels = class_labels(range(num_samples), num_classes, classes).numpy()
        save_npz_samples(out / "samples.npz", all_images, labels)
        _save_png(make_grid(all_images, labels, num_classes if classes is None else classes), out / "grid.png")
        result = (all_images, labels)
    state.wait_for_everyone()
    return result


def sample_and_score(model: torch.nn.Module, out_dir: PathLike, num_samples: int, *, state: Any = None,
                     reference: str = "", classifier: Optional[PathLike] = None, **generate_kwargs: Any
                     ) -> dict:
    """:func:`sample_to_dir` (collective), then on the main process :func:`hcvision.eval.score_samples` against
    ``reference`` ('' = no scoring; ``"digits"``: the held-out digits in ``classifier``'s features). Returns the
    scores (main process only), then the sampling time and the output paths."""
    out, t0 = Path(out_dir), time.perf_counter()
    samples = sample_to_dir(model, out, num_samples, state=state, **generate_kwargs)
    scores = {}
    if samples is not None and reference:
        from .eval.metrics import score_samples

        scores = score_samples(*samples, reference=reference, classifier=classifier)
    return {**scores, "sample_seconds": round(time.perf_counter() - t0, 2), "sample_grid": str(out / "grid.png"),
            "samples_npz": str(out / "samples.npz")}


# ------------------------------------------------------------------------------------------------
# Model loading
# ------------------------------------------------------------------------------------------------
def load_dit(checkpoint: PathLike, model_name: Optional[str] = None, *, ema: bool = True
             ) -> Tuple[torch.nn.Module, dict]:
    """A registered DiT rebuilt from a run directory, checkpoint directory or weights file
    (:func:`hcvision.models.loading.load_model`), in eval mode, plus ``info`` with the recorded objective and sampling
    settings under ``"sampling"`` (:func:`hcvision.diffusion.read_sampling_metadata`).
    """
    model, info = load_model(checkpoint, model_name, ema=ema, family="dit_", what="DiT")
    info["sampling"] = read_sampling_metadata(info["metadata"], f"weights file {info['weights']!r}")
    return model, info


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hcvision.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="registered DiT name (default: the one recorded in the weights)")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_* directory or weights file")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    add_arguments(p.add_argument_group("sampling (hcvision.sampling_spec)"),
                  defaults="default: as recorded with the weights, else")
    p.add_argument("--classes", default=None,
                   help="comma-separated class ids to sample, cycled (default: all classes, balanced)")
    p.add_argument("--vae", default="auto", help="hub id or local diffusers AutoencoderKL directory, or 'none' "
                                                 "(pixel-space models); default: the SD VAE for 4-channel models")
    p.add_argument("--scale-factor", type=float, default=None, help="latent scale (default: the VAE's, 0.18215)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--raw", action="store_true", help="use the trained (non-EMA) weights of a run/checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_out_dir(out: Path) -> None:
    """``out`` must be (or become) a fresh directory we can write: checked before anything is written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={str(out)!r} is a file, not a directory; choose a directory path")
    if (out / "samples.npz").exists():
        raise UsageError(f"--out={str(out)!r} already holds samples.npz; choose another directory")
    check_writable(out, "--out")


def parse_classes(spec: Optional[str], num_classes: int) -> Optional[List[int]]:
    """``"1,3,7"`` -> ``[1, 3, 7]``; every id must be a class of the model (not the null class)."""
    if spec is None:
        return None
    try:
        ids = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--classes={spec!r} is not valid; expected comma-separated integers in "
                         f"[0, {num_classes - 1}]") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise UsageError(f"--classes={spec!r} is not valid: {bad or 'no ids'}; the model has classes "
                         f"0..{num_classes - 1}")
    return ids


def run(args: argparse.Namespace) -> int:
    from .data.vae import DEFAULT_VAE, load_vae, vae_decoder

    if args.num_samples < 1:
        raise UsageError(f"--num-samples={args.num_samples} is not valid; expected an integer >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is not valid; expected an integer >= 1")
    out = Path(args.out)
    check_out_dir(out)
    state = process_state()
    model, info = load_dit(args.checkpoint, args.model, ema=not args.raw)
    model = model.to(state.device)
    rec = info["sampling"]
    objective = rec["objective"]
    spec = SamplingSpec(**{**rec["settings"], **settings_from_args(args)}).for_objective(objective, "--sampler")
    if spec.guidance_scale != 1.0 and model.null_class is None:
        raise UsageError(f"--guidance-scale={spec.guidance_scale} needs a model trained with label dropout (a null "
                         f"class); {info['weights']} has none: use --guidance-scale 1")
    gc = resolve_guidance_channels(spec.guidance_channels, model.in_chans, "--guidance-channels")
    classes = parse_classes(args.classes, model.num_classes)
    vae_spec = args.vae
    if vae_spec == "auto":
        vae_spec = DEFAULT_VAE if model.in_chans == 4 else "none"
    decode = None
    if vae_spec.lower() != "none":
        try:
            vae = load_vae(vae_spec, state.device)
        except (VaeUnavailableError, ValueError) as err:  # the message says how to supply a local VAE
            raise UsageError(str(err)) from None
        decode = vae_decoder(vae, args.scale_factor)
    elif model.in_chans not in (1, 3):
        raise UsageError(f"model {info['model']!r} generates {model.in_chans}-channel latents; pass --vae "
                         "PATH|hub-id to decode them to images")
    config = {"model": info["model"], "weights": info["weights"], "weights_sha256": info["sha256"],
              "classes": classes, "vae": vae_spec, "seed": args.seed, "num_classes": model.num_classes,
              # the keys `python -m hcvision.eval.generative --provenance sample_config.json` carries into its results
              **provenance_fields(num_samples=args.num_samples, objective=objective,
                                  sampling={**dataclasses.asdict(spec), "guidance_channels": gc or model.in_chans},
                                  ema="ema" in Path(info["weights"]).name)}
    sample_to_dir(model, out, args.num_samples, state=state, sample_shape=(model.in_chans, *model.input_size),
                  num_classes=model.num_classes, null_class=model.null_class, sampling=spec, classes=classes,
                  seed=args.seed, batch_size=args.batch_size, decode=decode, progress=not args.no_progress)
    if state.is_main_process:
        write_json(out / "sample_config.json", config)
        print(json.dumps({"samples": str(out / "samples.npz"), **config}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    check_out_dir(Path(args.out))
    with run_dir_lock(args.out, "--out"):  # one sampler per output directory (rank 0 holds it)
        return run(args)


def cli() -> int:
    """The console script ``hcv-sample``: :func:`main` behind the one error wrapper (one line, exit 2)."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="hcvision.sample"))
