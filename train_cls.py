#!/usr/bin/env python
"""Train or evaluate an image classifier (ViT / HC-ViT) with Accelerate.

    python train_cls.py                                   # digits demo: DHCx2 digits ViT, CPU, ~1 min
    python train_cls.py --config configs/cls/vit_base_dhc2.yaml data_dir=/data/imagenet
    python train_cls.py model=vit_digits_patch2_8_res output_dir=runs/res epochs=50 lr=2e-3
    python train_cls.py eval_only=true checkpoint=runs/res/model.safetensors
    python train_cls.py --config configs/cls/digits_upcycle_dhc2.yaml   # residual weights -> DHCx2, fine-tuned
    python train_cls.py eval_only=true model=vit_digits_patch2_8_dhc2 pretrained=vit_digits_patch2_8_res.hcv_digits
    python train_cls.py data_dir=wds/shards/ ...  |  data_dir=hfds/org/name data_root=~/hf_cache ...
    torchrun --nproc_per_node 2 train_cls.py ...            # DDP (accelerate launch works too)

``data_dir`` (the issue's ``data=``) takes timm's dataset names: '' (scikit-learn's digits, fixed held-out
split), an ImageFolder root with ``train/`` and ``val/``, ``wds/DIR`` or ``hfds/NAME``
(:mod:`hcvision.data.sources`).  ``pretrained=`` (:mod:`hcvision.pretrained`) starts from a file,
``local-dir:DIR``, ``hf-hub:ORG/NAME`` or a timm ``name.tag``.  Keys are those of :class:`ClsConfig` (and
:class:`hcvision.engine.BaseTrainConfig`); ``model_kwargs.<name>=value`` reaches the model.
Outputs (``output_dir``): config.yaml, checkpoints/, metrics.jsonl, tb/, model.safetensors,
results.json.  Exit codes: 0 done, 1 non-finite loss, 2 bad input, 128+N stopped by signal N
(a checkpoint was saved: rerun with ``resume=auto``).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import hcvision  # noqa: F401  (registers the hcvision models with timm)
from hcvision import io
from hcvision.data import classification_datasets
from hcvision.data.sources import make_loader, parse_data
from hcvision.engine import BaseTrainConfig, ConfigError, Run, check_model_name, require, train_main
from hcvision.eval.classification import TopKAccumulator, topk_hits
from hcvision.pretrained import PretrainedSource, create_pretrained, resolve_pretrained

TOPK = (1, 5)


@dataclass
class ClsConfig(BaseTrainConfig):
    """Classification run.  Defaults are the digits demo recipe (DHCx2 digits ViT on CPU)."""

    model: str = "vit_digits_patch2_8_dhc2"
    output_dir: str = "runs/digits_dhc2"
    epochs: int = 15
    global_batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    clip_grad: float = 1.0
    # -- data (timm's create_dataset names; hcvision.data.sources) ----------------------------
    data_dir: str = ""  # the issue's `data=`: '' digits, DIR (ImageFolder), wds/DIR (shards), hfds/NAME (HF datasets)
    data_root: str = ""  # hfds: the Hugging Face datasets cache (timm's --data-dir for hfds)
    train_split: str = "train"
    val_split: str = ""  # '' = 'val' for folders, 'validation' for wds/hfds (timm train.py's default)
    train_num_samples: int = 0  # wds: samples per epoch when _info.json does not say (timm's --train-num-samples)
    digits_augment: bool = False  # +-1 pixel random translation (hurt top-1 on 8x8 digits in our runs)
    img_size: int = 0  # 0 = the model's default input size (ImageFolder only)
    auto_augment: str = ""  # timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1' (ImageFolder only)
    reprob: float = 0.0  # random-erasing probability (ImageFolder only)
    eval_batch_size: int = 0  # per device; 0 = the training per-device batch
    # -- regularisation ------------------------------------------------------------------------
    mixup: float = 0.0  # mixup alpha (timm Mixup); 0 disables
    cutmix: float = 0.0  # cutmix alpha; 0 disables
    smoothing: float = 0.0  # label smoothing
    # -- evaluation ----------------------------------------------------------------------------
    eval_only: bool = False
    checkpoint: str = ""  # eval_only: model.safetensors file, or a run / checkpoint directory
    # -- fine-tuning -----------------------------------------------------------------------------
    pretrained: str = ""  # start from: FILE, local-dir:DIR, hf-hub:ORG/NAME or a timm name.tag (hcvision.pretrained)

    def validate(self) -> None:
        super().validate()
        require(self.mixup >= 0, "mixup", self.mixup, "a number >= 0 (0 disables)")
        require(self.cutmix >= 0, "cutmix", self.cutmix, "a number >= 0 (0 disables)")
        require(0.0 <= self.smoothing < 1.0, "smoothing", self.smoothing, "a number in [0, 1)")
        require(0.0 <= self.reprob <= 1.0, "reprob", self.reprob, "a probability in [0, 1]")
        require(self.img_size >= 0, "img_size", self.img_size, "an integer >= 0 (0: default)")
        require(self.eval_batch_size >= 0, "eval_batch_size", self.eval_batch_size, "an integer >= 0 (0: default)")
        require(self.train_num_samples >= 0, "train_num_samples", self.train_num_samples,
                "an integer >= 0 (0: from _info.json)")
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

    def __call__(self, model: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor, int]) -> Tuple[torch.Tensor, int]:
        x, y, skipped = batch
        self.skipped += int(torch.as_tensor(skipped).sum())  # an int, or per sample (streams)
        if self.mixup is not None and len(y) % 2:  # timm's Mixup pairs samples: needs an even batch
            x, y = x[:-1], y[:-1]
        if len(y) == 0:  # every file of this batch was unreadable: a zero loss keeps DDP in step
            return sum(p.sum() for p in model.parameters()) * 0.0, 0
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            logits = model(x)
            loss = self.soft_ce(logits.float(), soft)
        else:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing)
        return loss, len(y)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator) -> Dict[str, float]:
    """Top-k over the whole (sharded) split; ``gather_for_metrics`` drops the padding of uneven splits."""
    was_training = model.training
    model.eval()
    acc, skipped = TopKAccumulator(TOPK), 0
    for x, y, n_bad in loader:
        skipped += int(torch.as_tensor(n_bad).sum())  # per-sample counts under DDP stream dispatch
        logits = model(x) if len(y) else torch.zeros(0, 1, device=y.device)
        # per sample, so gather_for_metrics can drop the padding; unreadable files come as target -1
        acc.add_hits(*accelerator.gather_for_metrics((topk_hits(logits, y, TOPK), y >= 0)))
    model.train(was_training)
    skipped_t = accelerator.reduce(torch.tensor([skipped], device=accelerator.device), reduction="sum")
    return {**acc.compute(), "skipped_images": int(skipped_t.item())}


def evaluate_with_ema(model, ema_module, loader, accelerator) -> Dict[str, float]:
    metrics = evaluate(model, loader, accelerator)
    if ema_module is not None:
        metrics.update({f"ema_{k}": v for k, v in evaluate(ema_module, loader, accelerator).items() if "top" in k})
    return metrics


def load_for_eval(cfg: ClsConfig, model: torch.nn.Module, num_classes: int) -> str:
    """Load ``checkpoint=`` (hcvision safetensors, timm ``train.py`` checkpoint, run directory) into ``model``."""
    path = io.resolve_weights(cfg.checkpoint, ema=False)
    state = io.unwrap_state_dict(io.load_weights(path)[0])
    io.check_finite(state, f"checkpoint {str(path)!r}")
    head = state.get(f"{model.pretrained_cfg.get('classifier', 'head')}.weight")
    if head is not None and head.shape[0] != num_classes:
        raise ConfigError(f"checkpoint {str(path)!r} has {head.shape[0]} classes but the data has {num_classes}; "
                          "evaluate on data with the same classes or pass a matching checkpoint")
    try:
        model.load_state_dict(hcvision.models.filter_checkpoint(state, model), strict=True)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit model={cfg.model!r}: "
                          f"{str(e).strip().splitlines()[-1][:300]}") from None
    return str(path)


def check_input_size(model: torch.nn.Module, name: str, img_size: int) -> None:
    """An ``img_size`` the model cannot take is an error now, not after outputs were written mid-training."""
    embed = getattr(model, "patch_embed", None)
    fixed = tuple(getattr(embed, "img_size", None) or ())
    if img_size and fixed and getattr(embed, "strict_img_size", True) and not getattr(embed, "dynamic_img_size", False) \
            and (img_size, img_size) != fixed:
        raise ConfigError(f"img_size={img_size} does not fit model={name!r}, "
                          f"which takes {fixed[0]}x{fixed[1]} images; accepted: img_size=0 (the model's size), "
                          f"img_size={fixed[0]}, or model_kwargs.img_size={img_size} / model_kwargs.dynamic_img_size=true")


def build_model(cfg: ClsConfig, kwargs: Dict[str, Any], source: Optional[PretrainedSource]) -> torch.nn.Module:
    """The model to train or evaluate: random init, or ``pretrained=`` adapted the way timm adapts (head kept when the
    class count fits, else fresh; missing connection parameters at their Pre-Norm init)."""
    return timm.create_model(cfg.model, **kwargs) if source is None else create_pretrained(cfg.model, source, kwargs)


def run(cfg: ClsConfig) -> int:
    """Train (or evaluate) as configured; returns the process exit code."""
    check_model_name(cfg.model)
    source = resolve_pretrained(cfg.pretrained) if cfg.pretrained else None  # offline hub: exit 2 before any write
    data = parse_data(cfg.data_dir, cfg.data_root)
    meta_model = io.create_model(cfg.model, cfg.model_kwargs, meta=True)  # for its cfg: mean/std, size, channels
    if data.kind != "digits":
        check_input_size(meta_model, cfg.model, cfg.img_size)
    train_set, val_set, num_classes, collate = classification_datasets(
        data, meta_model, seed=cfg.seed, digits_augment=cfg.digits_augment, img_size=cfg.img_size,
        auto_augment=cfg.auto_augment, reprob=cfg.reprob, train_split=cfg.train_split, val_split=cfg.val_split,
        train_num_samples=cfg.train_num_samples, num_classes=int(cfg.model_kwargs.get("num_classes", 0)))
    kwargs = dict(cfg.model_kwargs)
    if int(kwargs.setdefault("num_classes", num_classes)) != num_classes:
        raise ConfigError(f"model_kwargs.num_classes={kwargs['num_classes']!r} does not match the "
                          f"{num_classes} classes of the data; drop it or use matching data")
    start = {"pretrained": source.record()} if source else {}
    with Run(cfg, "train_cls", writes=not cfg.eval_only) as run:
        model = build_model(cfg, kwargs, source)  # after Run seeded: the same weights (and fresh head) on every rank
        val_loader = make_loader(val_set, cfg.eval_batch_size or run.batch_size, train=False,
                                 num_workers=cfg.num_workers, collate=collate)
        if cfg.eval_only:
            weights = load_for_eval(cfg, model, num_classes) if cfg.checkpoint else str(source.file)
            model, val_loader = run.acc.prepare(model, val_loader)
            metrics = evaluate(model, val_loader, run.acc)
            run.print(json.dumps({"model": cfg.model, "checkpoint": weights, "data": data.describe(), **start,
                                  **metrics}))
            return 0
        train_loader = make_loader(train_set, run.batch_size, train=True, num_workers=cfg.num_workers, collate=collate)
        loss_fn = ClsLoss(cfg, num_classes)
        trainer = run.trainer(model, train_loader, loss_fn, eval_loaders=[val_loader],
                              evaluate_fn=lambda m, e: evaluate_with_ema(m, e, run.eval_loaders[0], run.acc))
        result = run.fit(trainer)
        if result is None:
            return run.exit_code
        metrics = result.eval_metrics or evaluate_with_ema(run.model, run.ema and run.ema.module,
                                                           run.eval_loaders[0], run.acc)
        skipped = int(run.acc.reduce(torch.tensor([loss_fn.skipped], device=run.acc.device), reduction="sum"))
        if result.state.images_seen == 0:
            raise ConfigError(f"no training image of data_dir={cfg.data_dir!r} could be read ({skipped} skipped); "
                              "nothing was trained and no weights or results are written")
        run.save_weights({"model": cfg.model, "model_kwargs": json.dumps(kwargs), "top1": f"{metrics['top1']:.4f}",
                          **({"pretrained": source.spec, "pretrained_sha256": source.sha256} if source else {})})
        run.write_results({
            "model": cfg.model, "model_kwargs": kwargs, "params": sum(p.numel() for p in run.unwrapped.parameters()),
            "data": data.describe(), **start, **metrics, "skipped_train_images": skipped,
            "weights": str(Path(cfg.output_dir) / "model.safetensors"),
        }, shown=("model", "top1", "top5", "epochs", "images_per_sec"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(ClsConfig, run, argv, "train_cls.py")


if __name__ == "__main__":
    sys.exit(main())
