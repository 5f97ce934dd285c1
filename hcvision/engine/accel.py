"""Accelerator construction, seeding and batch-size arithmetic."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration

from .config import BaseTrainConfig, ConfigError

__all__ = ["build_accelerator", "release_accelerator", "per_device_batch_size", "seed_everything", "step_seed",
           "reseed_for_step"]


def build_accelerator(cfg: BaseTrainConfig, *, log_with_tensorboard: Optional[bool] = None) -> Accelerator:
    """An :class:`Accelerator` for ``cfg``.

    The seedable sampler makes the shuffling order a function of (seed, epoch) on every rank, which
    together with ``skip_first_batches`` gives exact mid-epoch resume.  Gradient accumulation is done
    by :class:`hcvision.engine.loop.Trainer` itself (Accelerate is told 1): Accelerate's own counter
    drifts across epochs whose length is not a multiple of the accumulation and is stored in the
    RNG file, while ours is a function of the position in the epoch, so a resumed run accumulates
    exactly the same batches.
    """
    tb = cfg.tensorboard if log_with_tensorboard is None else log_with_tensorboard
    if tb:
        try:
            import tensorboard  # noqa: F401
        except ImportError:  # the tracker is optional; metrics.jsonl is always written
            tb = False
    try:
        accelerator = Accelerator(
            cpu=_multi_process_cpu_only(),
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=1,
            log_with="tensorboard" if tb else None,
            project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/tb"),
            # non_blocking: host-to-device copies of pinned batches overlap compute (a no-op on CPU)
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
            step_scheduler_with_optimizer=False,
        )
    except ValueError as e:  # e.g. fp16 without a GPU: keep the message short and name the value
        raise ConfigError(f"mixed_precision={cfg.mixed_precision!r} is not usable here: {e}") from None
    return accelerator


def _multi_process_cpu_only() -> bool:
    """True under a multi-process launcher (torchrun) on a machine without GPU/XPU.

    Accelerate only picks the gloo ``MULTI_CPU`` backend when told ``cpu=True``; otherwise every
    torchrun worker silently runs as an independent single process (verified with accelerate 1.15).
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return world > 1 and not torch.cuda.is_available() and not has_xpu


def per_device_batch_size(global_batch_size: int, num_processes: int, grad_accum_steps: int) -> int:
    """Per-device micro-batch so the global batch stays ``global_batch_size`` on any hardware."""
    denom = num_processes * grad_accum_steps
    if global_batch_size % denom:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by num_processes ({num_processes}) x "
            f"grad_accum_steps ({grad_accum_steps}) = {denom}; choose a multiple of {denom}"
        )
    return global_batch_size // denom


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed that depends only on (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**31], dtype=np.uint64)) % (2**63 - 1))


def reseed_for_step(seed: int, step: int, rank: int) -> None:
    """Reseed all global RNGs from (seed, micro-step, rank).

    Why: dropout, drop-path and mixup draw from the global RNGs, and so does the data loader
    (a base seed per iterator).  A resumed run creates its iterator at a different point than the
    uninterrupted run, so restoring RNG state alone is not enough for bit-identical weights.  Making
    each step's randomness a pure function of its index removes that history dependence.
    """
    seed_everything(step_seed(seed, step, rank))


def release_accelerator(accelerator: Accelerator) -> None:
    """Close trackers and, in a single process, reset Accelerate's global state.

    Accelerate keeps its state in process-wide singletons; resetting lets a program (the demo,
    tests, a notebook) run several trainings with different settings one after another.  With
    several processes the distributed group stays up: it belongs to the launcher.
    """
    accelerator.end_training()
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
