#!/usr/bin/env python
"""Train or evaluate an image classifier (ViT / HC-ViT) with Accelerate.

    hcv-train-cls                                         # digits demo: DHCx2 digits ViT, CPU, ~1 min
    hcv-train-cls --help                                  # every key: type, default, accepted values
    hcv-train-cls --config vit_base_dhc2 data_dir=/data/imagenet        # a packaged recipe (or a YAML file)
    hcv-train-cls model=vit_digits_patch2_8_res output_dir=runs/res epochs=50 lr=2e-3
    hcv-train-cls eval_only=true checkpoint=runs/res      # the model its run recorded
    hcv-train-cls --config digits_upcycle_dhc2            # residual weights -> DHCx2, fine-tuned
    hcv-train-cls data_dir=wds/shards/ ...  |  data_dir=hfds/org/name data_root=~/hf_cache ...
    torchrun --nproc_per_node 2 -m hcvision.train_cls ... # DDP (accelerate launch works too)

(``hcv-train-cls`` = ``python -m hcvision.train_cls`` = ``python train_cls.py`` in a checkout.)

Keys are those of :class:`ClsConfig` and :class:`hcvision.engine.BaseTrainConfig` (``model_kwargs.<name>=value``
reaches the model); data sources are :mod:`hcvision.data.sources`, ``pretrained=`` sources :mod:`hcvision.pretrained`.
Outputs (``output_dir``): config.yaml, provenance.json, checkpoints/, metrics.jsonl, tb/, model.safetensors,
results.json. Exit codes: 0 done, 1 non-finite loss, 2 bad input, 128+N stopped by signal N (resume=auto goes on).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F

import hcvision  # noqa: F401  (registers the hcvision models with timm)
from hcvision.data import TransformOptions, classification_datasets
from hcvision.data.sources import make_loader, parse_data
from hcvision.data.transforms import CHECKS as TF
from hcvision.engine import BaseTrainConfig, ConfigError, Run, check_model_name, checked, train_main
from hcvision.engine.config import checked_model_kwargs
from hcvision.eval.classification import evaluate, evaluate_with_ema, load_classifier_weights, recorded_classifier
from hcvision.models.loading import create_model
from hcvision.pretrained import create_pretrained, resolve_pretrained


@dataclass
class ClsConfig(BaseTrainConfig):
    """Classification run.  Defaults are the digits demo recipe (DHCx2 digits ViT on CPU).

    The transform keys (``img_size`` to ``std``) are timm ``train.py``'s, passed to timm's ``create_transform`` for
    image data (DIR, wds/, hfds/; :mod:`hcvision.data.transforms`); the embedded digits take only ``mean`` and ``std``
    and refuse the others. ``''``, ``0`` and ``[]`` mean the model's value (its pretrained cfg)."""

    RECIPES = "cls"  # --config NAME looks in the packaged configs/cls/

    model: str = "vit_digits_patch2_8_dhc2"
    output_dir: str = "runs/digits_dhc2"
    epochs: int = 15
    global_batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: float = 1.0
    # -- data (timm's create_dataset names; hcvision.data.sources) ---------------------------------
    data_dir: str = ""  # '' the embedded digits, DIR (ImageFolder), wds/DIR (shards), hfds/NAME (HF datasets)
    data_root: str = ""  # hfds: the Hugging Face datasets cache (timm's --data-dir for hfds)
    train_split: str = "train"
    val_split: str = ""  # '' = 'val' for folders, 'validation' for wds/hfds (timm train.py's default)
    train_num_samples: int = checked(0, lambda v: v >= 0, "an integer >= 0 (0: from _info.json)")  # wds epoch size
    digits_augment: bool = False  # embedded digits only: +-1 pixel random translation (hurt top-1 in our runs)
    img_size: int = checked(0, *TF["img_size"])  # image data: input size (0: the model's)
    scale: Tuple[float, float] = checked((0.08, 1.0), *TF["scale"])  # image data, train: crop area range (1,1: all)
    ratio: Tuple[float, float] = checked((3 / 4, 4 / 3), *TF["ratio"])  # image data, train: crop aspect range
    hflip: float = checked(0.5, *TF["hflip"])  # image data, train: horizontal flip probability
    vflip: float = checked(0.0, *TF["vflip"])  # image data, train: vertical flip probability
    color_jitter: float = checked(0.4, *TF["color_jitter"])  # image data, train: brightness/contrast/saturation
    auto_augment: str = checked("", *TF["auto_augment"])  # image data, train: timm auto-augment policy (--aa)
    reprob: float = checked(0.0, *TF["reprob"])  # image data, train: random-erasing probability
    remode: str = checked("pixel", *TF["remode"])  # image data, train: random-erasing fill
    recount: int = checked(1, *TF["recount"])  # image data, train: most random-erasing regions per image
    interpolation: str = checked("", *TF["interpolation"])  # image data: resize filter ('random': per train image)
    crop_pct: float = checked(0.0, *TF["crop_pct"])  # image data, eval: centre-crop fraction (0: the model's)
    mean: Union[Tuple[float, ...], float] = checked((), *TF["mean"])  # normalisation, images and digits ([]: model's)
    std: Union[Tuple[float, ...], float] = checked((), *TF["std"])  # normalisation, images and digits ([]: model's)
    eval_batch_size: int = checked(0, lambda v: v >= 0, "an integer >= 0 (0: default)")  # per device; 0: training's
    # -- optimisation: regularisation (timm's Mixup and label smoothing; 0 disables each) ----------
    mixup: float = checked(0.0, lambda v: v >= 0, "a number >= 0 (0 disables)")  # mixup alpha
    cutmix: float = checked(0.0, lambda v: v >= 0, "a number >= 0 (0 disables)")  # cutmix alpha
    smoothing: float = checked(0.0, lambda v: 0 <= v < 1, "a number in [0, 1)")
    # -- evaluation and fine-tuning ----------------------------------------------------------------
    eval_only: bool = False
    checkpoint: str = ""  # eval_only: model.safetensors file, or a run / checkpoint directory
    pretrained: str = ""  # start from: FILE, local-dir:DIR, hf-hub:ORG/NAME or a timm name.tag (hcvision.pretrained)

    def validate(self) -> None:
        super().validate()
        if self.eval_only and bool(self.checkpoint) == bool(self.pretrained):
            raise ConfigError("eval_only=true needs one of checkpoint=PATH (a model.safetensors file or a run "
                              "directory) or pretrained=SOURCE (the adapted start point of a fine-tuning run, step 0)")
        if self.checkpoint and not self.eval_only:
            raise ConfigError(f"checkpoint={self.checkpoint!r} is only used with eval_only=true; "
                              "to continue training use resume=auto or resume=DIR")


class ClsLoss:
    """Cross-entropy (soft targets under mixup/cutmix, label smoothing otherwise); counts skipped files."""

    def __init__(self, cfg: ClsConfig, num_classes: int) -> None:
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                               num_classes=num_classes)
            self.soft_ce = SoftTargetCrossEntropy()
        self.smoothing = cfg.smoothing
        self.skipped = 0

    def __call__(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor, int]
                 ) -> Tuple[torch.Tensor, int]:
        x, y, skipped = batch
        self.skipped += int(torch.as_tensor(skipped).sum())  # an int, or per sample (streams)
        if self.mixup is not None and len(y) % 2:  # timm's Mixup pairs samples: needs an even batch
            x, y = x[:-1], y[:-1]
        if len(y) == 0:  # every file of this batch was unreadable: a zero loss keeps DDP in step
            return sum(p.sum() for p in model.parameters()) * 0.0, 0
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            return self.soft_ce(model(x).float(), soft), len(y)
        return F.cross_entropy(model(x).float(), y, label_smoothing=self.smoothing), len(y)


def run(cfg: ClsConfig) -> int:
    """Train (or evaluate) as configured; returns the process exit code."""
    if cfg.eval_only and cfg.checkpoint:  # the model its run recorded, unless model= is given (then they must agree)
        name, recorded_kwargs = recorded_classifier(cfg.checkpoint)
        if name and "model" in cfg.given_keys and name != cfg.model:
            raise ConfigError(f"model={cfg.model!r} does not match checkpoint={cfg.checkpoint!r}, which holds a "
                              f"{name!r}; drop model= to use the checkpoint's, or pass a matching checkpoint")
        if name:  # the run's kwargs too (its width, depth ...), under what model_kwargs.* the user gives
            cfg.model = name
            cfg.model_kwargs = checked_model_kwargs(name, {**recorded_kwargs, **cfg.model_kwargs})
    check_model_name(cfg.model)
    source = resolve_pretrained(cfg.pretrained) if cfg.pretrained else None  # offline hub: exit 2 before any write
    data = parse_data(cfg.data_dir, cfg.data_root)
    meta_model = create_model(cfg.model, cfg.model_kwargs, meta=True)  # for its cfg: mean/std, size, channels
    train_set, val_set, num_classes, collate = classification_datasets(
        data, meta_model, seed=cfg.seed, digits_augment=cfg.digits_augment, transform=TransformOptions.from_config(cfg),
        train_split=cfg.train_split, val_split=cfg.val_split, train_num_samples=cfg.train_num_samples,
        num_classes=cfg.model_kwargs.get("num_classes"))
    kwargs = {**cfg.model_kwargs, "num_classes": num_classes}
    start = {"pretrained": source.record()} if source else {}
    with Run(cfg, "train_cls", writes=not cfg.eval_only) as run:
        # Built after Run seeded it: the same weights (and fresh head) on every rank. pretrained= is adapted the way
        # timm adapts: the head kept when the class count fits, missing connection parameters at their Pre-Norm init.
        model = create_pretrained(cfg.model, source, kwargs) if source else timm.create_model(cfg.model, **kwargs)
        val_loader = make_loader(val_set, cfg.eval_batch_size or run.batch_size, train=False,
                                 num_workers=cfg.num_workers, collate=collate)
        if cfg.eval_only:
            weights = (load_classifier_weights(model, cfg.checkpoint, cfg.model, num_classes) if cfg.checkpoint
                       else str(source.file))
            model, val_loader = run.acc.prepare(model, val_loader)
            metrics = evaluate(model, val_loader, run.acc)
            run.print(json.dumps({"model": cfg.model, "checkpoint": weights, "data": data.describe(), **start,
                                  **metrics}))
            return 0
        train_loader = make_loader(train_set, run.batch_size, train=True, num_workers=cfg.num_workers, collate=collate,
                                   rank=run.acc.process_index, world_size=run.acc.num_processes)
        loss_fn = ClsLoss(cfg, num_classes)
        trainer = run.trainer(model, train_loader, loss_fn, eval_loaders=[val_loader],
                              evaluate_fn=lambda m, e: evaluate_with_ema(m, e, run.eval_loaders[0], run.acc))
        result = run.fit(trainer)
        if result is None:
            return run.exit_code
        metrics = result.eval_metrics or evaluate_with_ema(run.model, run.ema and run.ema.module,
                                                           run.eval_loaders[0], run.acc)
        skipped = int(run.acc.reduce(torch.tensor([loss_fn.skipped], device=run.acc.device), reduction="sum"))
        run.save_weights({"model": cfg.model, "model_kwargs": json.dumps(kwargs), "top1": f"{metrics['top1']:.4f}",
                          **({"pretrained": source.spec, "pretrained_sha256": source.sha256} if source else {})})
        run.write_results({
            "model": cfg.model, "model_kwargs": kwargs, "params": sum(p.numel() for p in run.unwrapped.parameters()),
            "data": data.describe(), **start, **metrics, "skipped_train_images": skipped,
            "weights": str(Path(cfg.output_dir) / "model.safetensors"),
        }, shown=("model", "top1", "top5", "epochs", "images_per_sec"))
    return 0


CONFIG = ClsConfig  # the trainer's config class (--help, the comparison runner)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(ClsConfig, run, argv, "train_cls.py")


if __name__ == "__main__":
    sys.exit(main())
