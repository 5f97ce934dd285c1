#!/usr/bin/env python
"""Train a class-conditional (HC-)DiT with Accelerate, then sample it and score the samples.

    hcv-train-dit                                           # digits demo: SHCx2 DiT in pixel space, CPU, < 10 min
    hcv-train-dit objective=flow                            # the same with SiT's flow matching (SDE sampler)
    hcv-train-dit --config dit_xl_2_shc2 data_dir=/data/imagenet256_latents   # a packaged recipe (or a YAML file)
    torchrun --nproc_per_node 8 -m hcvision.train_dit --config ...   # DDP (accelerate launch works too)

(``hcv-train-dit`` = ``python -m hcvision.train_dit`` = ``python train_dit.py`` in a checkout; ``--help`` lists every
key.)

``data_dir`` '' is scikit-learn's digits in pixel space (1x8x8 in [-1, 1]), else a directory written by ``python -m
hcvision.data.latents``. ``objective`` ddpm is DiT's loss, flow SiT's; ``repa_weight > 0`` adds REPA's alignment with a
frozen encoder read from the local file ``repa_encoder`` (:mod:`hcvision.diffusion`). The weights saved are the DiT's
and record the sampling defaults ``python -m hcvision.sample`` uses. The EMA model then draws ``eval_samples``
class-balanced samples into ``samples/`` and results.json gets FID, IS, precision and recall against the held-out
digits (plus ``cls_acc``) or, for latents, ``eval_ref`` (:func:`hcvision.eval.score_samples`). Exit codes: 0 done,
1 non-finite loss, 2 bad input, 128+N stopped by signal N (rerun with ``resume=auto``).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
from torch.utils.data import DataLoader

import hcvision  # noqa: F401  (registers the DiT family with timm)
from hcvision.cli import UsageError
from hcvision.data.generative import check_decoder, check_model_fits, diffusion_dataset, sample_decoder
from hcvision.diffusion import OBJECTIVES, TIME_SAMPLINGS, DiffusionLoss, make_sampler, sampling_metadata
from hcvision.diffusion.guidance import resolve_guidance_channels
from hcvision.diffusion.repa import DEFAULT_ENCODER, REPA, base_model, load_repa_encoder_for
from hcvision.engine import BaseTrainConfig, ConfigError, Run, check_model_name, checked, require, train_main
from hcvision.engine.config import checked_model_kwargs
from hcvision.eval import check_digits_classifier, provenance_fields
from hcvision.sample import sample_and_score
from hcvision.sampling_spec import SamplingSpec, config_field, renamed_config_keys
from hcvision.sampling_spec import settings as sampling_settings


@dataclass
class DitConfig(BaseTrainConfig):
    """Diffusion run.  Defaults are the digits demo (SHCx2 DiT in pixel space on CPU)."""

    RECIPES = "dit"  # --config NAME looks in the packaged configs/dit/

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
    cpu_threads: int = 1  # a 2nd thread buys little for a 1M-param DiT, costs ~3x on a busy 2-core box (measured)
    # -- data --------------------------------------------------------------------------------------
    data_dir: str = ""  # '' = embedded digits (pixels); else a directory from `python -m hcvision.data.latents`
    hflip: bool = True  # latent/pixel directories: random horizontal flip (the stored flipped posterior)
    # -- diffusion ---------------------------------------------------------------------------------
    objective: str = checked("ddpm", lambda v: v in OBJECTIVES, f"one of {OBJECTIVES}")  # ddpm: DiT's, flow: SiT's
    time_sampling: str = "uniform"  # flow: uniform (SiT, REPA) | logit_normal (SD3, LightningDiT); ddpm: uniform
    class_dropout_prob: float = checked(0.1, lambda v: 0 <= v < 1, "a number in [0, 1) (0: no guidance)")  # for CFG
    repa_weight: float = checked(0.0, lambda v: 0 <= v < float("inf"), "a number >= 0 (0: no REPA)")  # paper: 0.5
    repa_block: int = checked(8, lambda v: v >= 1, "a block of the DiT (>= 1)")  # 1-based; REPA: 8 of SiT-XL's 28
    repa_encoder: str = ""  # local weights file of the frozen encoder (never downloaded)
    repa_encoder_model: str = DEFAULT_ENCODER  # its timm name (DINOv2-B/14)
    repa_encoder_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm kwargs of the encoder (tests: tiny ones)
    repa_projector_dim: int = checked(2048, lambda v: v >= 1, "an integer >= 1")  # REPA's MLP projector width
    # -- evaluation: final sampling and scoring ----------------------------------------------------
    # from the EMA model; the sampling settings below are declared once in hcvision.sampling_spec (and recorded in
    # the weights for hcvision.sample)
    eval_samples: int = checked(1000, lambda v: v >= 0, "an integer >= 0 (0 skips)")
    sampler: str = config_field("sampler")
    sampling_steps: int = config_field("sampling_steps", 100)  # the demo's 100 (DiT: 250)
    guidance_scale: float = config_field("guidance_scale")
    guidance_channels: int = config_field("guidance_channels")
    guidance_interval: Tuple[float, float] = config_field("guidance_interval")
    diffusion_norm: float = config_field("diffusion_norm")
    eval_batch_size: int = checked(250, lambda v: v >= 1, "an integer >= 1")  # per process
    # also sample without guidance (same seeds, samples_unguided/) and report fid_unguided (final/fid_unguided)
    eval_unguided: bool = False
    eval_seed: int = 0
    eval_ref: str = ""  # latent runs: reference images / .npz / stats for FID (Inception); digits: held-out split
    vae: str = ""  # latent runs: VAE that decodes samples; '' = the one recorded by the latent extraction
    digits_classifier: str = ""  # '' = $HCV_DIGITS_CLASSIFIER or weights/vit_digits_patch2_8_res.hcv_digits.safetensors

    RENAMED_KEYS = renamed_config_keys()  # eval_scheduler, eval_steps, cfg_scale: accepted with a warning

    def validate(self) -> None:
        super().validate()
        self.repa_encoder_kwargs = checked_model_kwargs(self.repa_encoder_model, self.repa_encoder_kwargs,
                                                        "repa_encoder_kwargs")
        if "class_dropout_prob" in self.model_kwargs:  # the trainer passes its own key to the model
            raise ConfigError("model_kwargs.class_dropout_prob is set by the trainer's class_dropout_prob; accepted: "
                              f"class_dropout_prob={self.model_kwargs['class_dropout_prob']} instead")
        require(self.time_sampling in (TIME_SAMPLINGS if self.objective == "flow" else ("uniform",)), "time_sampling",
                self.time_sampling, f"one of {TIME_SAMPLINGS} for objective=flow, 'uniform' for objective=ddpm")
        try:
            self.sampling()
        except UsageError as err:
            raise ConfigError(str(err)) from None
        if self.guidance_scale != 1.0 and self.class_dropout_prob == 0.0 and self.eval_samples:
            raise ConfigError(f"guidance_scale={self.guidance_scale} needs label dropout (class_dropout_prob > 0) to "
                              "train the null class; set guidance_scale=1 or class_dropout_prob=0.1")

    def sampling(self) -> SamplingSpec:
        """The final evaluation's sampling (and the weights' defaults), the sampler '' made the objective's."""
        values = {f.name: getattr(self, f.name) for f in sampling_settings()}
        return SamplingSpec(**values).for_objective(self.objective)


def run(cfg: DitConfig) -> int:
    """Train, sample and score as configured; returns the process exit code."""
    check_model_name(cfg.model, family="dit_", what="DiT")
    train_set, sample_shape, classes, info = diffusion_dataset(cfg.data_dir, cfg.seed, cfg.hflip)
    num_classes = len(classes)
    kwargs = {**cfg.model_kwargs, "num_classes": num_classes, "class_dropout_prob": cfg.class_dropout_prob}
    dit = check_model_fits(cfg.model, cfg.model_kwargs, sample_shape, num_classes)  # on the meta device
    spec = cfg.sampling()
    guidance_channels = resolve_guidance_channels(cfg.guidance_channels, sample_shape[0])  # fits the data: now
    encoder = load_repa_encoder_for(dit, cfg.repa_block, cfg.repa_encoder, cfg.repa_encoder_model, info,
                                    **cfg.repa_encoder_kwargs) if cfg.repa_weight else None
    classifier = check_digits_classifier(cfg.digits_classifier) if cfg.eval_samples and not cfg.data_dir else None
    if cfg.eval_samples:
        check_decoder(info, cfg.vae)  # needed after training: find out now if it is missing
    with Run(cfg, "train_dit") as run:
        model = timm.create_model(cfg.model, **kwargs)
        repa = None if encoder is None else REPA(model, encoder, cfg.repa_block, cfg.repa_weight,
                                                 cfg.repa_projector_dim)  # trains the projector with the DiT
        loader = DataLoader(train_set, batch_size=run.batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers, pin_memory=run.acc.device.type == "cuda")
        loss_fn = DiffusionLoss(run.acc, cfg.objective, cfg.time_sampling, repa=repa)
        result = run.fit(run.trainer(repa or model, loader, loss_fn))
        if result is None:
            return run.exit_code
        run.save_weights({"model": cfg.model, "model_kwargs": json.dumps(kwargs), **sampling_metadata(
            cfg.objective, spec, time_sampling=cfg.time_sampling if cfg.objective == "flow" else None)},
            select=base_model)  # the DiT's weights only
        metrics: Dict[str, Any] = {}  # scores first: what a reader of results.json looks for
        if cfg.eval_samples:  # the EMA weights draw class-balanced samples (collective), rank 0 scores them
            ema = base_model(run.ema.module if run.ema is not None else run.unwrapped).eval()
            metrics = sample_and_score(
                ema, Path(cfg.output_dir) / "samples", cfg.eval_samples, state=run.acc, classifier=classifier,
                reference=cfg.eval_ref or ("" if cfg.data_dir else "digits"), sample_shape=sample_shape,
                num_classes=num_classes, null_class=ema.null_class, sampling=spec, seed=cfg.eval_seed,
                batch_size=cfg.eval_batch_size, progress=cfg.progress_bar,
                decode=sample_decoder(info, cfg.vae, run.acc.device))
            if cfg.eval_unguided and spec.guidance_scale != 1.0:  # 2026 papers report FID with and without guidance
                unguided = sample_and_score(
                    ema, Path(cfg.output_dir) / "samples_unguided", cfg.eval_samples, state=run.acc,
                    classifier=classifier, reference=cfg.eval_ref or ("" if cfg.data_dir else "digits"),
                    sample_shape=sample_shape, num_classes=num_classes, null_class=ema.null_class,
                    sampling=dataclasses.replace(spec, guidance_scale=1.0), seed=cfg.eval_seed,
                    batch_size=cfg.eval_batch_size, progress=cfg.progress_bar,
                    decode=sample_decoder(info, cfg.vae, run.acc.device))
                metrics.update({f"{k}_unguided": unguided[k] for k in ("fid", "cls_acc") if k in unguided})
        run.write_results({
            "model": cfg.model, "model_kwargs": kwargs, "params": sum(p.numel() for p in model.parameters()),
            "data": info["data"], "objective": cfg.objective, **metrics,
            "weights": "ema" if run.ema is not None else "raw", "eval_samples": cfg.eval_samples,
            **provenance_fields(sampling={**dataclasses.asdict(spec),
                                          "guidance_channels": guidance_channels or sample_shape[0]}),
            "eval_nfe": make_sampler(spec.sampler, spec.sampling_steps).nfe,
            **({"repa_weight": cfg.repa_weight, "repa_block": cfg.repa_block} if repa else {}),
        }, shown=("model", "objective", "fid", "precision", "recall", "cls_acc", "global_step", "images_per_sec"))
    return 0


CONFIG = DitConfig  # the trainer's config class (--help, the comparison runner)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(DitConfig, run, argv, "train_dit.py")


if __name__ == "__main__":
    sys.exit(main())
