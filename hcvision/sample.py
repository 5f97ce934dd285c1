"""Sample a trained (HC-)DiT: class-balanced, reproducible for any number of processes, ADM-compatible output.

    python -m hcvision.sample --model dit_xl_2_shc2 --checkpoint runs/dit_xl_2_shc2 --num-samples 50000 \
        --out samples/ --vae /models/sd-vae-ft-ema                       # DiT's evaluation: 250 DDPM steps, cfg 1.5
    torchrun --nproc_per_node 8 -m hcvision.sample ...                 # same files, 8x faster

Sample ``i`` has class ``i % num_classes`` and its own seed ``(seed, i)``: its initial noise and every DDPM noise
draw come from a generator of its own, so the output does not depend on the batch size or the number of processes.
Rank ``r`` of ``W`` generates samples ``r, r + W, r + 2W, ...``; every batch is padded to ``--batch-size`` rows so
all forward passes have the same shape (a row's numbers then do not depend on what else is in the batch, which
makes the files bit-identical across world sizes, not just equal in distribution). The first ``N`` samples are
written, no duplicates and no gaps.

Output (``--out``): ``images/000000.png ...``, ``samples.npz`` (``arr_0`` uint8 NHWC as ADM's evaluator reads it,
``arr_1`` the class labels), ``grid.png`` (one row per class) and ``sample_config.json``.
Weights: the EMA weights of a run or checkpoint directory by default (``--raw`` for the trained weights); a
``.safetensors`` or ``.pt`` file (official DiT and diffusers checkpoints too) is used as it is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .data.latents import VaeUnavailableError, process_state
from .diffusion import SCHEDULERS, guided_output, make_scheduler

__all__ = [
    "class_labels",
    "decode_to_uint8",
    "generate",
    "load_dit",
    "make_grid",
    "resolve_weights",
    "sample_seed",
    "sample_to_dir",
    "main",
]

PathLike = Union[str, os.PathLike]
Decoder = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Labels, seeds, pixels
# ------------------------------------------------------------------------------------------------
def class_labels(indices: Sequence[int], num_classes: int) -> Tensor:
    """Class-balanced labels: sample ``i`` gets class ``i % num_classes``."""
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes


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
@torch.no_grad()
def _denoise_batch(model: torch.nn.Module, labels: Tensor, generators: List[torch.Generator],
                   sample_shape: Tuple[int, ...], *, scheduler: str, steps: int, cfg_scale: float,
                   guidance_channels: Optional[int], null_class: Optional[int], device: torch.device) -> Tensor:
    """One batch of the reverse process with one generator per row.

    The same chain as :func:`hcvision.diffusion.sample` (tested equal for a batch of one), but every random draw is
    per row: the initial noise here and the DDPM noise through diffusers' list-of-generators convention.
    """
    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps, device=device)
    channels = sample_shape[0]
    x = torch.cat([torch.randn((1, *sample_shape), generator=g) for g in generators]).to(device)
    x = x * sched.init_noise_sigma
    full_output = scheduler == "ddpm"  # learned_range DDPM takes the variance channels too
    use_cfg = cfg_scale != 1.0
    y = labels.to(device)
    y_in = torch.cat([y, torch.full_like(y, null_class)]) if use_cfg else y
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
        out = model(x_in, t.to(device=device, dtype=torch.long).expand(x_in.shape[0]), y_in)
        if use_cfg:
            out = guided_output(*out.chunk(2), cfg_scale, guidance_channels)
        out = out if full_output else out[:, :channels]
        x = sched.step(out, t, x, generator=generators).prev_sample
    return x


def generate(
    model: torch.nn.Module,
    indices: Sequence[int],
    *,
    sample_shape: Tuple[int, ...],
    num_classes: int,
    null_class: Optional[int],
    scheduler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.5,
    guidance_channels: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 32,
    decode: Optional[Decoder] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> Tuple[np.ndarray, Tensor]:
    """Generate the samples ``indices`` (any subset of ``0..N-1``); returns uint8 NHWC images and their labels.

    ``decode`` maps model outputs to images in [-1, 1] (a VAE decoder); ``None`` means pixel space.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not valid; accepted: {', '.join(SCHEDULERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; expected an integer >= 1")
    if cfg_scale != 1.0 and null_class is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a model trained with label dropout (a null class); "
                         "use cfg_scale=1 for this model")
    device = torch.device(device)
    indices = list(indices)
    labels = class_labels(indices, num_classes)
    images: List[np.ndarray] = []
    batches = range(0, len(indices), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({scheduler}, {steps} steps)", unit="batch")
    for b in batches:
        idx = indices[b: b + batch_size]
        pad = batch_size - len(idx)
        # Pad with copies of the last sample: every forward pass then has the same shape on every rank.
        gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in idx + [idx[-1]] * pad]
        y = class_labels(idx + [idx[-1]] * pad, num_classes)
        x = _denoise_batch(model, y, gens, tuple(sample_shape), scheduler=scheduler, steps=steps, cfg_scale=cfg_scale,
                           guidance_channels=guidance_channels, null_class=null_class, device=device)
        if decode is not None:
            x = decode(x)
        images.append(decode_to_uint8(x[: len(idx)]))
    if not images:
        return np.zeros((0, 0, 0, 0), dtype=np.uint8), labels
    return np.concatenate(images), labels


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _atomic_save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def make_grid(images: np.ndarray, labels: Sequence[int], num_classes: int, per_row: int = 10,
              min_cell: int = 32) -> np.ndarray:
    """One row per class (row ``k`` = the first ``per_row`` samples of class ``k``), 2-px gaps; small images are
    enlarged by an integer factor (nearest) to at least ``min_cell`` pixels."""
    labels = np.asarray(labels)
    n, h, w, c = images.shape
    f = max(1, math.ceil(min_cell / max(h, w)))
    cell_h, cell_w, gap = h * f, w * f, 2
    grid = np.full((num_classes * (cell_h + gap) + gap, per_row * (cell_w + gap) + gap, c), 255, dtype=np.uint8)
    for k in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_row]):
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
        _atomic_save_png(arr, img_dir / f"{i:06d}.png")
    state.wait_for_everyone()  # every rank's PNGs are on disk
    result = None
    if state.is_main_process:
        from .eval.npz import save_npz_samples

        all_images = np.stack([_read_png(img_dir / f"{i:06d}.png") for i in range(num_samples)])
        labels = class_labels(range(num_samples), generate_kwargs["num_classes"]).numpy()
        save_npz_samples(out / "samples.npz", all_images, labels)
        grid = make_grid(all_images, labels, generate_kwargs["num_classes"])
        _atomic_save_png(grid, out / "grid.png")
        result = (all_images, labels)
    state.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------------
# Model loading
# ------------------------------------------------------------------------------------------------
def resolve_weights(checkpoint: PathLike, ema: bool = True) -> Path:
    """The weights file to sample from: EMA by default.

    A run directory holds ``model_ema.safetensors`` / ``model.safetensors``; a checkpoint directory
    (``checkpoints/step_*``) holds ``ema.safetensors`` / ``model.safetensors``; a file is taken as it is.
    """
    p = Path(checkpoint)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"checkpoint={str(p)!r} does not exist; expected a run directory, a checkpoints/step_* "
                         "directory, or a .safetensors / .pt weights file")
    names = ("model_ema.safetensors", "ema.safetensors") if ema else ("model.safetensors",)
    for name in names:
        if (p / name).is_file():
            return p / name
    present = sorted(q.name for q in p.iterdir() if q.suffix in (".safetensors", ".pt"))
    hint = " (pass --raw to use the trained weights)" if ema and (p / "model.safetensors").is_file() else ""
    raise ValueError(f"checkpoint={str(p)!r} has no {' or '.join(names)}{hint}; it holds {present or 'no weights'}")


def _load_state_dict(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    # Never unpickle arbitrary objects: official DiT .pt files are plain tensor dicts.
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj, {}


def load_dit(model_name: str, weights: PathLike, model_kwargs: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """Build a registered DiT and load weights (hcvision, official DiT or diffusers layout); eval mode."""
    import timm

    import hcvision.models.dit  # noqa: F401  (registers the DiT names)
    from hcvision.models.dit import checkpoint_filter_fn

    if not timm.is_model(model_name):
        close = [n for n in timm.list_models("dit_*") if n.startswith(model_name.rsplit("_", 1)[0])][:4]
        raise ValueError(f"model={model_name!r} is not a registered DiT; e.g. {', '.join(close) or 'dit_xl_2_shc2'}")
    sd, meta = _load_state_dict(Path(weights))
    trained_as = meta.get("model")
    if trained_as and trained_as != model_name:
        raise ValueError(f"{str(weights)!r} holds weights of {trained_as!r}, not {model_name!r}; pass --model "
                         f"{trained_as}")
    kwargs = json.loads(meta.get("model_kwargs", "{}")) if model_kwargs is None else dict(model_kwargs)
    model = timm.create_model(model_name, **kwargs)
    sd = checkpoint_filter_fn(sd, model)
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hcvision.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered DiT name, e.g. dit_xl_2_shc2 or dit_digits_2_shc2")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_* directory or weights file")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--scheduler", default="ddpm", choices=SCHEDULERS)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide the first k epsilon channels (default: 3 for 4-channel latents as DiT, else all)")
    p.add_argument("--vae", default="auto", help="hub id or local diffusers AutoencoderKL directory, or 'none' "
                                                 "(pixel-space models); default: the SD VAE for 4-channel models")
    p.add_argument("--scale-factor", type=float, default=None, help="latent scale (default: the VAE's, 0.18215)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--raw", action="store_true", help="use the trained (non-EMA) weights of a run/checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from .data.latents import DEFAULT_SCALE_FACTOR, DEFAULT_VAE, load_vae

    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} is not valid; expected an integer >= 1")
    if args.steps < 1 or args.steps > 1000:
        raise ValueError(f"--steps={args.steps} is not valid; expected an integer in [1, 1000]")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise ValueError(f"--cfg-scale={args.cfg_scale} is not valid; expected a number >= 0 (1: no guidance)")
    out = Path(args.out)
    if (out / "samples.npz").exists():
        raise ValueError(f"--out={str(out)!r} already holds samples.npz; choose another directory")
    weights = resolve_weights(args.checkpoint, ema=not args.raw)
    state = process_state()
    model = load_dit(args.model, weights).to(state.device)
    sample_shape = (model.in_chans, *model.input_size)
    vae_spec = args.vae
    if vae_spec == "auto":
        vae_spec = DEFAULT_VAE if model.in_chans == 4 else "none"
    decode = None
    if vae_spec.lower() != "none":
        vae = load_vae(vae_spec, state.device)
        scale = args.scale_factor or float(getattr(vae.config, "scaling_factor", DEFAULT_SCALE_FACTOR))
        decode = lambda z: vae.decode(z.to(vae.dtype) / scale).sample  # noqa: E731
    elif model.in_chans not in (1, 3):
        raise ValueError(f"model {args.model!r} generates {model.in_chans}-channel latents; pass --vae PATH|hub-id "
                         "to decode them to images")
    gc = args.guidance_channels
    if gc is None and model.in_chans == 4:
        gc = 3  # DiT guides the first 3 of the 4 latent channels
    if gc is not None and not 1 <= gc <= model.in_chans:
        raise ValueError(f"--guidance-channels={gc} is not valid; expected 1..{model.in_chans}")
    config = {"model": args.model, "weights": str(weights), "num_samples": args.num_samples,
              "scheduler": args.scheduler, "steps": args.steps, "cfg_scale": args.cfg_scale, "guidance_channels": gc,
              "vae": vae_spec, "seed": args.seed, "num_classes": model.num_classes}
    sample_to_dir(model, out, args.num_samples, state=state, sample_shape=sample_shape,
                  num_classes=model.num_classes, null_class=model.null_class, scheduler=args.scheduler,
                  steps=args.steps, cfg_scale=args.cfg_scale, guidance_channels=gc, seed=args.seed,
                  batch_size=args.batch_size, decode=decode, progress=not args.no_progress)
    if state.is_main_process:
        from .io import write_json

        write_json(out / "sample_config.json", config)
        print(json.dumps({"samples": str(out / "samples.npz"), **config}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"hcvision.sample: error: {e}", file=sys.stderr)
        return 2
    except VaeUnavailableError as e:  # the message says how to supply a local VAE
        if os.environ.get("RANK", "0") == "0":
            print(f"hcvision.sample: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
