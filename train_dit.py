#!/usr/bin/env python
"""Train a class-conditional (HC-)DiT with Accelerate, then sample it and score the samples.

    python train_dit.py                                     # digits demo: SHCx2 DiT in pixel space, CPU, < 10 min
    python train_dit.py objective=flow                      # the same with SiT's flow matching (SDE sampler)
    python train_dit.py --config configs/dit/dit_xl_2_shc2.yaml data_dir=/data/imagenet256_latents
    python train_dit.py model=dit_digits_2_res output_dir=runs/dit_res      # the residual baseline
    torchrun --nproc_per_node 8 train_dit.py --config ...   # DDP (accelerate launch works too)

``data_dir`` is a directory written by ``python -m hcvision.data.latents`` (VAE posteriors, or pixels with
``--vae none``); empty means scikit-learn's digits in pixel space (1x8x8, [-1, 1]) with the fixed held-out split.
``objective=ddpm`` (default) is DiT's: uniform t over 1000 linear-beta steps, hybrid loss (epsilon MSE + VLB for the
learned sigma). ``objective=flow`` is SiT's: linear interpolant, velocity MSE, ``time_sampling=uniform|logit_normal``.
``repa_weight > 0`` adds REPA's alignment of the tokens after block ``repa_block`` with a frozen encoder read from the
local file ``repa_encoder`` (pixel data only: the encoder sees the clean images). Both: label dropout
``class_dropout_prob`` (null class = ``num_classes``), AdamW, EMA in fp32; the losses are :mod:`hcvision.diffusion`.
Everything generic (config, accumulation, exact resume, SIGTERM, NaN guard, logging) is :mod:`hcvision.engine`.

The saved weights are the DiT's alone (no REPA projector or encoder) and record the objective and the sampling
defaults (``eval_scheduler``, ``eval_steps``, ``cfg_scale``, ``guidance_*``), which ``python -m hcvision.sample`` uses.
At the end the EMA model generates ``eval_samples`` class-balanced samples (see :mod:`hcvision.sample`):
``samples/grid.png`` (one row per class), ``samples/samples.npz`` (ADM layout) and ``results.json`` with FID,
precision, recall (and IS) from ``hcv-digits`` features against the held-out digits, plus ``cls_acc``, the share of
samples the digits classifier assigns to the requested class. Latent runs are scored only if ``eval_ref`` names
reference images or statistics (Inception features; see :mod:`hcvision.eval.generative`).

Exit codes: 0 done, 1 non-finite loss, 2 bad input, 128+N stopped by signal N (rerun with ``resume=auto``).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
from torch.utils.data import DataLoader

import hcvision  # noqa: F401  (registers the DiT family with timm)
from hcvision import io
from hcvision.data.generative import diffusion_dataset, digits_pixels, sample_decoder
from hcvision.diffusion import (DEFAULT_SAMPLER, OBJECTIVES, SAMPLERS, TIME_SAMPLINGS, DiffusionLoss, make_sampler,
                                sampling_metadata)
from hcvision.diffusion.repa import DEFAULT_ENCODER, REPA, base_model, load_repa_encoder
from hcvision.engine import BaseTrainConfig, ConfigError, Run, check_model_name, require, train_main


@dataclass
class DitConfig(BaseTrainConfig):
    """Diffusion run.  Defaults are the digits demo (SHCx2 DiT in pixel space on CPU)."""

    model: str = "dit_digits_2_shc2"
    output_dir: str = "runs/dit_digits_shc2"
    epochs: int = 100  # 22 updates per epoch at batch 64: 2,200 updates
    global_batch_size: int = 64
    lr: float = 2e-3  # a 1M-parameter DiT on 8x8 digits; DiT-XL uses 1e-4 at batch 256
    weight_decay: float = 0.0  # DiT trains with AdamW, weight decay 0
    lr_schedule: str = "constant"  # DiT: constant lr
    warmup_steps: int = 100
    clip_grad: float = 1.0
    ema: bool = True
    ema_decay: float = 0.995  # DiT: 0.9999 over 400K+ updates; the demo has 2.2K
    log_every: int = 50
    cpu_threads: int = 1  # torch intra-op threads when training on CPU; 0 = torch's default (one per core)
    # -- data ----------------------------------------------------------------------------------
    data_dir: str = ""  # '' = embedded digits (pixels); else a directory from `python -m hcvision.data.latents`
    hflip: bool = True  # latent/pixel directories: random horizontal flip (the stored flipped posterior)
    # -- diffusion -----------------------------------------------------------------------------
    objective: str = "ddpm"  # ddpm (DiT: epsilon + learned sigma) | flow (SiT: linear interpolant, velocity)
    time_sampling: str = "uniform"  # flow: uniform (SiT, REPA) | logit_normal (SD3, LightningDiT); ddpm: uniform
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (DiT: 0.1)
    repa_weight: float = 0.0  # REPA's lambda (paper: 0.5); 0 = no REPA
    repa_block: int = 8  # align the tokens after this block (1-based; REPA: 8 of SiT-XL's 28)
    repa_encoder: str = ""  # local weights file of the frozen encoder (never downloaded)
    repa_encoder_model: str = DEFAULT_ENCODER  # its timm name (DINOv2-B/14)
    repa_encoder_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm kwargs of the encoder (tests: tiny ones)
    repa_projector_dim: int = 2048  # hidden width of REPA's MLP projector
    # -- final sampling and evaluation ---------------------------------------------------------
    eval_samples: int = 1000  # class-balanced samples from the EMA model after training; 0 skips
    eval_scheduler: str = ""  # '' = the objective's default: ddpm (DDPM), sde (flow); see hcvision.diffusion.SAMPLERS
    eval_steps: int = 100
    cfg_scale: float = 1.5
    guidance_channels: int = 0  # 0 = auto: 3 of 4 latent channels (DiT), all channels otherwise
    guidance_interval: Tuple[float, float] = (0.0, 1.0)  # guide only at noise levels in [lo, hi] (REPA: 0, 0.7)
    eval_batch_size: int = 250  # per process
    eval_seed: int = 0
    eval_ref: str = ""  # latent runs: reference images / .npz / stats for FID (Inception); digits: held-out split
    vae: str = ""  # latent runs: VAE that decodes samples; '' = the one recorded by the latent extraction
    digits_classifier: str = ""  # '' = $HCV_DIGITS_CLASSIFIER or weights/vit_digits_patch2_8_res.hcv_digits.safetensors

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.class_dropout_prob < 1.0, "class_dropout_prob", self.class_dropout_prob,
                "a number in [0, 1) (0 disables classifier-free guidance)")
        require(self.eval_samples >= 0, "eval_samples", self.eval_samples, "an integer >= 0 (0 skips)")
        require(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        require(self.time_sampling in (TIME_SAMPLINGS if self.objective == "flow" else ("uniform",)), "time_sampling",
                self.time_sampling, f"one of {TIME_SAMPLINGS} for objective=flow, 'uniform' for objective=ddpm")
        require(self.eval_scheduler in ("", *SAMPLERS[self.objective]), "eval_scheduler", self.eval_scheduler,
                f"one of {SAMPLERS[self.objective]} for objective={self.objective} ('' = {self.sampler})")
        lo, hi = self.guidance_interval
        require(0.0 <= lo <= hi <= 1.0, "guidance_interval", list(self.guidance_interval),
                "[lo, hi] with 0 <= lo <= hi <= 1 (noise levels: 0 = data, 1 = noise)")
        require(0.0 <= self.repa_weight < float("inf"), "repa_weight", self.repa_weight, "a number >= 0 (0: no REPA)")
        require(self.repa_block >= 1, "repa_block", self.repa_block, "an integer >= 1 (a block of the DiT)")
        require(self.repa_projector_dim >= 1, "repa_projector_dim", self.repa_projector_dim, "an integer >= 1")
        require(1 <= self.eval_steps <= 1000, "eval_steps", self.eval_steps, "an integer in [1, 1000]")
        require(0 <= self.cfg_scale < float("inf"), "cfg_scale", self.cfg_scale, "a number >= 0 (1: no guidance)")
        require(self.guidance_channels >= 0, "guidance_channels", self.guidance_channels, "0 (auto) or k >= 1")
        require(self.cpu_threads >= 0, "cpu_threads", self.cpu_threads, "an integer >= 0 (0: default)")
        require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        if self.cfg_scale != 1.0 and self.class_dropout_prob == 0.0 and self.eval_samples:
            raise ConfigError(f"cfg_scale={self.cfg_scale} needs label dropout (class_dropout_prob > 0) to train the "
                              "null class; set cfg_scale=1 or class_dropout_prob=0.1")

    @property
    def sampler(self) -> str:
        """The sampler of the final evaluation and the saved weights' default: ``eval_scheduler`` if it is one of the
        objective's, else the objective's default."""
        ok = self.eval_scheduler in SAMPLERS.get(self.objective, ())
        return self.eval_scheduler if ok else DEFAULT_SAMPLER.get(self.objective, "ddpm")


def digits_classifier_path(cfg: DitConfig) -> Path:
    """The digits classifier used for FID/precision/recall/cls_acc; fails with how to produce it.

    Order: ``digits_classifier=``, then hcvision.eval's default (``$HCV_DIGITS_CLASSIFIER``, else the residual digits
    ViT committed under ``weights/``).
    """
    from hcvision.eval.features import DIGITS_CLASSIFIER_ENV, default_digits_classifier_path, load_digits_classifier

    path = Path(cfg.digits_classifier) if cfg.digits_classifier else default_digits_classifier_path()
    if not path.is_file():
        raise ConfigError(
            f"the digits classifier {str(path)!r} does not exist; the demo scores its samples with it. Produce one "
            f"with the classification demo (`python train_cls.py --config configs/cls/digits_dhc2.yaml "
            f"output_dir=runs/clf` writes runs/clf/model.safetensors) and pass digits_classifier=PATH or set "
            f"{DIGITS_CLASSIFIER_ENV}=PATH; or set eval_samples=0 to train without scoring")
    try:
        load_digits_classifier(path)
    except Exception as e:  # corrupt file, foreign model: say so now, not after training
        raise ConfigError(f"digits_classifier={str(path)!r} cannot be used: {e}") from None
    return path


def check_model_fits(cfg: DitConfig, model_kwargs: Dict[str, Any], sample_shape: Tuple[int, ...],
                     num_classes: int) -> torch.nn.Module:
    """The data's sample shape and class count must be what the model takes (checked on the meta device, whose
    model is returned)."""
    declared = model_kwargs.get("num_classes")
    if declared is not None and int(declared) != num_classes:
        raise ConfigError(f"model_kwargs.num_classes={declared!r} does not match the {num_classes} classes of the data "
                          f"(class ids 0..{num_classes - 1}); drop it or use matching data")
    model = io.create_model(cfg.model, {**model_kwargs, "num_classes": num_classes}, meta=True)
    takes = (model.in_chans, *model.input_size)
    if tuple(sample_shape) != takes:
        raise ConfigError(
            f"the data's samples have shape {tuple(sample_shape)} but model={cfg.model!r} takes {takes}; choose a "
            f"model for this input (e.g. a dit_* model for 4x32x32 SD-VAE latents of 256px images, dit_digits_2_* "
            f"for the digits) or set model_kwargs.input_size={sample_shape[-1]} / model_kwargs.in_chans="
            f"{sample_shape[0]}")
    return model


def repa_encoder(cfg: DitConfig, model: torch.nn.Module, info: Dict[str, Any]) -> Optional[torch.nn.Module]:
    """REPA's frozen encoder from its local file (None without REPA); every misfit is a ConfigError before any write.

    It reads images of the DiT's token grid times its patch size (REPA: 16 x 14 = 224 px for SiT-XL/2 at 256 px).
    """
    if not cfg.repa_weight:
        return None
    if info["mode"] != "pixels":
        raise ConfigError(f"repa_weight={cfg.repa_weight} needs the clean images for the encoder, but data_dir="
                          f"{cfg.data_dir!r} holds {info['mode']} latents only; use pixel data or repa_weight=0")
    depth = len(model.blocks)
    require(cfg.repa_block <= depth, "repa_block", cfg.repa_block, f"a block in 1..{depth} (model has {depth} blocks)")
    patch = int(cfg.repa_encoder_kwargs.get("patch_size", 14))  # DINOv2's patch is 14
    return load_repa_encoder(cfg.repa_encoder, cfg.repa_encoder_model, img_size=model.grid_size[0] * patch,
                             **cfg.repa_encoder_kwargs)


def sample_and_score(cfg: DitConfig, accelerator: Any, model: torch.nn.Module, sample_shape: Tuple[int, ...],
                     num_classes: int, info: Dict[str, Any], classifier: Optional[Path]) -> Dict[str, Any]:
    """EMA samples -> grid, npz and metrics (metrics on the main process; collective call)."""
    from hcvision.sample import sample_to_dir

    gc = cfg.guidance_channels or (3 if sample_shape[0] == 4 else None)
    if gc is not None and gc > sample_shape[0]:
        raise ConfigError(f"guidance_channels={gc} is not valid; the samples have {sample_shape[0]} channels")
    out = Path(cfg.output_dir) / "samples"
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    result = sample_to_dir(model, out, cfg.eval_samples, state=accelerator, sample_shape=sample_shape,
                           num_classes=num_classes, null_class=model.null_class, scheduler=cfg.sampler,
                           steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, guidance_channels=gc,
                           guidance_interval=cfg.guidance_interval, seed=cfg.eval_seed,
                           batch_size=cfg.eval_batch_size, decode=sample_decoder(info, cfg.vae, accelerator.device),
                           progress=cfg.progress_bar)
    model.train(was_training)
    metrics: Dict[str, Any] = {"sample_seconds": round(time.perf_counter() - t0, 2),
                               "sample_grid": str(out / "grid.png"), "samples_npz": str(out / "samples.npz")}
    if result is None:  # not the main process
        return metrics
    images, labels = result
    if not cfg.data_dir:
        from hcvision.eval import digits_to_uint8, generative_metrics

        ref = digits_to_uint8((digits_pixels("val").images + 1.0) * 8.0)  # [-1, 1] -> sklearn's 0..16
        scores = generative_metrics(images, ref.permute(0, 2, 3, 1).numpy(), feature_extractor="hcv-digits",
                                    weights_path=classifier, gen_labels=labels, isc=True, fid=True, prc=True)
        metrics.update(reference="digits held-out split", **scores)
    elif cfg.eval_ref:
        from hcvision.eval import generative_metrics

        scores = generative_metrics(images, cfg.eval_ref, isc=True, fid=True, prc=True)
        metrics.update(reference=cfg.eval_ref, **scores)
    return metrics


def run(cfg: DitConfig) -> int:
    """Train, sample and score as configured; returns the process exit code."""
    check_model_name(cfg.model, family="dit_", what="DiT")
    train_set, sample_shape, classes, info = diffusion_dataset(cfg.data_dir, cfg.seed, cfg.hflip)
    num_classes = len(classes)
    kwargs = {**cfg.model_kwargs, "num_classes": num_classes, "class_dropout_prob": cfg.class_dropout_prob}
    encoder = repa_encoder(cfg, check_model_fits(cfg, cfg.model_kwargs, sample_shape, num_classes), info)
    classifier = digits_classifier_path(cfg) if (cfg.eval_samples and not cfg.data_dir) else None
    if cfg.eval_samples and cfg.data_dir and info["mode"] == "vae":
        from hcvision.data.latents import load_vae

        try:  # the decoder is needed after training: find out now if it is missing
            load_vae(cfg.vae or info["vae"])
        except Exception as e:
            raise ConfigError(f"{e} (or set eval_samples=0 to train without sampling)") from None
    if len(train_set) < cfg.global_batch_size // cfg.grad_accum_steps:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is larger than the {len(train_set)} training "
                          "samples; use a smaller batch")
    with Run(cfg, "train_dit") as run:
        if run.acc.device.type == "cpu" and cfg.cpu_threads:
            # A ~1M-parameter DiT does (1024 x 96)-sized matmuls: a second OpenMP thread buys little on an idle
            # machine and costs ~3x wall time on a busy one (measured on the 2-core CI box), so the demo uses one.
            torch.set_num_threads(cfg.cpu_threads)
        model = timm.create_model(cfg.model, **kwargs)
        repa = None if encoder is None else REPA(model, encoder, cfg.repa_block, cfg.repa_weight,
                                                 cfg.repa_projector_dim)  # trains the projector with the DiT
        loader = DataLoader(train_set, batch_size=run.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers)
        loss_fn = DiffusionLoss(run.acc, cfg.objective, cfg.time_sampling, repa=repa)
        result = run.fit(run.trainer(repa or model, loader, loss_fn))
        if result is None:
            return run.exit_code
        run.save_weights({"model": cfg.model, "model_kwargs": json.dumps(kwargs), **sampling_metadata(
            cfg.objective, time_sampling=cfg.time_sampling if cfg.objective == "flow" else None, sampler=cfg.sampler,
            steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, guidance_channels=cfg.guidance_channels,
            guidance_interval=cfg.guidance_interval)}, select=base_model)  # the DiT's weights only
        metrics: Dict[str, Any] = {}
        if cfg.eval_samples:
            sampler = base_model(run.ema.module if run.ema is not None else run.unwrapped)
            metrics = sample_and_score(cfg, run.acc, sampler, sample_shape, num_classes, info, classifier)
        quality = ("fid", "precision", "recall", "cls_acc", "is_mean", "is_std")
        run.write_results({
            "model": cfg.model, "model_kwargs": kwargs, "params": sum(p.numel() for p in model.parameters()),
            "data": info["data"], "objective": cfg.objective, **{k: metrics[k] for k in quality if k in metrics},
            "weights": "ema" if run.ema is not None else "raw", "eval_samples": cfg.eval_samples,
            "eval_scheduler": cfg.sampler, "eval_steps": cfg.eval_steps,
            "eval_nfe": make_sampler(cfg.sampler, cfg.eval_steps).nfe, "cfg_scale": cfg.cfg_scale,
            "guidance_interval": list(cfg.guidance_interval),
            **({"repa_weight": cfg.repa_weight, "repa_block": cfg.repa_block} if repa else {}),
            **{k: v for k, v in metrics.items() if k not in quality},
        }, shown=("model", "objective", "fid", "precision", "recall", "cls_acc", "global_step", "images_per_sec"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(DitConfig, run, argv, "train_dit.py")


if __name__ == "__main__":
    sys.exit(main())
