"""A task-agnostic training loop: accumulation, LR schedule, EMA, checkpoints, signals, NaN guard.

The task supplies a ``loss_fn(model, batch) -> (loss, num_images)`` and optionally an
``evaluate_fn(model, ema) -> metrics`` run at epoch ends; everything else (resume, logging,
fault handling) lives here so classification and diffusion training behave identically.
"""
from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches

from .. import io
from .accel import reseed_for_step
from .checkpoint import CheckpointManager, TrainState
from .config import BaseTrainConfig
from .ema import ema_state_dict, load_ema_state_dict
from .logging import MetricsLogger, ProgressBar, ThroughputMeter

__all__ = [
    "fit_to_exit_code",
    "NonFiniteLossError",
    "SignalGuard",
    "FitResult",
    "Trainer",
    "build_optimizer",
    "lr_factor",
    "steps_per_epoch",
]

LossFn = Callable[[torch.nn.Module, Any], Tuple[torch.Tensor, int]]
EvalFn = Callable[[torch.nn.Module, Optional[torch.nn.Module]], Dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/inf; the last good checkpoint is left untouched."""


class SignalGuard:
    """Turn SIGTERM/SIGINT into a flag the loop polls, so the run can checkpoint and exit.

    A second signal of the same kind falls back to the previous handler (e.g. a hard Ctrl-C).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            prev = self._previous.get(signum)
            signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum

    def __enter__(self) -> "SignalGuard":
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


@dataclass
class FitResult:
    state: TrainState
    interrupted_by: Optional[int] = None  # signal number when stopped by SIGTERM/SIGINT
    images_per_sec: float = 0.0
    checkpoint: Optional[str] = None
    eval_metrics: Dict[str, float] = field(default_factory=dict)


def build_optimizer(model: torch.nn.Module, cfg: BaseTrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on 1-D params and ``model.no_weight_decay()``.

    The HC/FC ViTs list their static connection parameters in ``no_weight_decay()`` (the paper's
    recipe; decaying them was seen to diverge), so the factory's grouping is the paper's.
    ``connection_lr_scale`` multiplies the LR of every connection parameter (their own param groups);
    ``layer_decay < 1`` scales each layer's LR the way timm's ``--layer-decay`` does (BEiT's layer-wise decay over
    the model's ``group_matcher``: the stem ``layer_decay^(L+1)``, block ``i`` ``layer_decay^(L-i)``, the head 1), and
    a connection parameter inside a block gets its block's scale times ``connection_lr_scale``.
    """
    from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

    from ..connections import Connection

    kwargs: Dict[str, Any] = {}
    if "adam" in cfg.opt.lower() or "lamb" in cfg.opt.lower():
        kwargs.update(betas=tuple(cfg.betas), eps=cfg.eps)
    layer_decay = getattr(cfg, "layer_decay", 1.0)
    if cfg.connection_lr_scale == 1.0 and layer_decay == 1.0:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if layer_decay < 1.0:
        base_groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip,
                                               layer_decay=layer_decay)
    else:
        base_groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    conn = {id(p) for m in model.modules() if isinstance(m, Connection) for p in m.parameters()}
    groups = []
    for group in base_groups:
        scale = group.pop("lr_scale", 1.0)  # applied here: the trainer sets every group's LR from its initial LR
        for is_conn in (False, True):
            params = [p for p in group["params"] if (id(p) in conn) == is_conn]
            if params:
                lr = cfg.lr * scale * (cfg.connection_lr_scale if is_conn else 1.0)
                groups.append({**group, "params": params, "lr": lr})
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=0.0, **kwargs)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimiser update ``step`` (0-based).

    Linear warmup to 1 over ``warmup_steps`` updates, then constant or a half-cosine down to
    ``min_ratio``.  A pure function of the step: resuming needs no scheduler state.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_schedule={schedule!r} is not valid; expected 'cosine' or 'constant'")
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def steps_per_epoch(batches_per_epoch: int, grad_accum_steps: int) -> int:
    """Optimiser updates per epoch; a short last accumulation window still makes an update."""
    return math.ceil(batches_per_epoch / grad_accum_steps)


class Trainer:
    """Runs epochs over a prepared loader with exact resume.

    Args:
        cfg: run config (optimisation, checkpoint and logging fields are read).
        accelerator: the run's accelerator.
        model, optimizer, train_loader: objects already passed through ``accelerator.prepare``.
        loss_fn: ``(model, batch) -> (mean loss over the local batch, local batch size)``.
        ema: optional fp32 EMA (timm ``ModelEmaV3``) of the unwrapped model, not prepared.
        evaluate_fn: optional ``(model, ema_module) -> metrics`` called at the end of each epoch.
    """

    def __init__(
        self,
        cfg: BaseTrainConfig,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Any,
        loss_fn: LossFn,
        *,
        ema: Any = None,
        evaluate_fn: Optional[EvalFn] = None,
    ) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.model = model
        self.optimizer = optimizer
        self.loader = train_loader
        self.loss_fn = loss_fn
        self.ema = ema
        self.evaluate_fn = evaluate_fn
        self.ckpt = CheckpointManager(accelerator, cfg.output_dir, keep=cfg.keep_checkpoints)
        self.logger = MetricsLogger(accelerator, cfg.output_dir)
        self.state = TrainState()
        self.batches_per_epoch = len(train_loader)
        if self.batches_per_epoch == 0:
            raise ValueError("the training loader yields no batches (data set smaller than one global batch?)")
        self.updates_per_epoch = steps_per_epoch(self.batches_per_epoch, cfg.grad_accum_steps)
        # The LR schedule always spans `epochs`; `max_steps` only stops early.  So a run cut short by
        # max_steps and then resumed follows exactly the schedule of an uninterrupted run.
        self.total_steps = cfg.epochs * self.updates_per_epoch
        self.stop_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    # -- resume ----------------------------------------------------------------------------------
    def resume(self, path: Optional[str]) -> bool:
        """Load a checkpoint directory (from :meth:`CheckpointManager.resolve`); False if none."""
        if path is None:
            return False
        state, ema_sd = self.ckpt.load(path)
        if self.ema is not None and ema_sd is not None:
            load_ema_state_dict(self.ema, ema_sd)
        self.state = state
        return True

    # -- helpers ---------------------------------------------------------------------------------
    def _set_lr(self, step: int) -> float:
        min_ratio = self.cfg.min_lr / self.cfg.lr
        f = lr_factor(step, self.total_steps, self.cfg.warmup_steps, self.cfg.lr_schedule, min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        return self.cfg.lr * f  # the base LR (groups may be scaled by layer or connection)

    def _any_rank(self, *flags: bool) -> List[bool]:
        """OR of each flag over ranks (one small all-reduce; none on a single process)."""
        if self.acc.num_processes == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.acc.device)
        t = self.acc.reduce(t, reduction="sum")
        return [bool(v > 0) for v in t.tolist()]

    def _diagnostics(self) -> Dict[str, float]:
        """Connection diagnostics of the static matrices (about 2 ms on the digits ViTs, no forward pass), if on."""
        if not self.cfg.diagnostics or not self.acc.is_main_process:
            return {}
        from ..analysis.diagnostics import connection_diagnostics

        return connection_diagnostics(self.acc.unwrap_model(self.model))

    def save_checkpoint(self) -> str:
        ema_sd = ema_state_dict(self.ema) if self.ema is not None else None
        return str(self.ckpt.save(self.state, ema_sd))

    def _window(self, i: int) -> Tuple[bool, int]:
        """(is this batch the last of its accumulation window, window size) for batch ``i`` of an epoch."""
        accum = self.cfg.grad_accum_steps
        start = (i // accum) * accum
        size = min(accum, self.batches_per_epoch - start)
        return i == start + size - 1, size

    # -- main loop -------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg, acc, st = self.cfg, self.acc, self.state
        meter = ThroughputMeter()
        bar = ProgressBar(acc, total=self.stop_step, initial=st.global_step, enabled=cfg.progress_bar)
        result = FitResult(state=st)
        last_loss = float("nan")
        running: List[float] = []
        with SignalGuard() as guard:
            while st.epoch < cfg.epochs and st.global_step < self.stop_step:
                self.model.train()
                self.loader.set_epoch(st.epoch)
                # Accelerate forwards the epoch to the sampler *or* the data set, not both: do the latter.
                if hasattr(getattr(self.loader, "dataset", None), "set_epoch"):
                    self.loader.dataset.set_epoch(st.epoch)
                loader = skip_first_batches(self.loader, st.step_in_epoch) if st.step_in_epoch else self.loader
                meter.start()
                epoch_images = 0
                for batch in loader:
                    reseed_for_step(cfg.seed, st.micro_step, acc.process_index)
                    is_update, window = self._window(st.step_in_epoch)
                    ctx = acc.no_sync(self.model) if not is_update else _nullcontext()
                    with ctx:
                        loss, n_local = self.loss_fn(self.model, batch)
                        nonfinite, stop = self._any_rank(not bool(torch.isfinite(loss.detach()).all()),
                                                         guard.received is not None)
                        if nonfinite:
                            meter.stop(epoch_images)
                            bar.close()
                            latest = self.ckpt.latest()
                            raise NonFiniteLossError(
                                f"non-finite loss ({loss.item()}) at epoch {st.epoch}, batch {st.step_in_epoch}, "
                                f"step {st.global_step}; stopped without updating the weights. Last good checkpoint: "
                                f"{latest if latest else 'none'} (lower lr, enable clip_grad, or check the data)"
                            )
                        acc.backward(loss / window)
                    running.append(loss.detach().item())
                    epoch_images += n_local * acc.num_processes
                    st.images_seen += n_local * acc.num_processes
                    st.micro_step += 1
                    st.step_in_epoch += 1
                    if not is_update:
                        continue
                    if cfg.clip_grad > 0:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    lr = self._set_lr(st.global_step)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    st.global_step += 1
                    io.failpoint("train.step")
                    if self.ema is not None:
                        self.ema.update(acc.unwrap_model(self.model), step=st.global_step)
                    last_loss = sum(running) / len(running)
                    running.clear()
                    bar.update(1, loss=last_loss, lr=lr, img_s=meter.peek(epoch_images))
                    if st.global_step % cfg.log_every == 0:
                        self.logger.log({"train/loss": last_loss, "train/lr": lr, "epoch": st.epoch,
                                         **self._diagnostics()}, st.global_step)
                    done = st.global_step >= self.stop_step
                    if stop or (cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0 and not done):
                        meter.stop(epoch_images)
                        epoch_images = 0
                        result.checkpoint = self.save_checkpoint()
                        if stop:
                            bar.close()
                            result.interrupted_by = guard.received or signal.SIGTERM
                            result.images_per_sec = meter.rate
                            return result
                        meter.start()
                    if done:
                        break
                meter.stop(epoch_images)
                if st.step_in_epoch >= self.batches_per_epoch:
                    st.epoch += 1
                    st.step_in_epoch = 0
                    if self.evaluate_fn is not None:
                        result.eval_metrics = self.evaluate_fn(self.model, self.ema.module if self.ema else None)
                        self.logger.log({**{f"val/{k}": v for k, v in result.eval_metrics.items()},
                                         "epoch": st.epoch}, st.global_step)
                    result.checkpoint = self.save_checkpoint()
                elif st.global_step >= self.stop_step:  # max_steps ended the run mid-epoch
                    result.checkpoint = self.save_checkpoint()
        bar.close()
        self.logger.log({"train/loss": last_loss, "images_per_sec": meter.rate}, st.global_step)
        result.images_per_sec = meter.rate
        return result


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def fit_to_exit_code(trainer: "Trainer", script: str) -> Tuple[Optional[FitResult], int]:
    """Run ``trainer.fit()`` the way both scripts report it: ``(result, 0)`` when done, ``(None, 1)`` after a
    non-finite loss and ``(result, 128 + N)`` when stopped by signal N (a checkpoint was saved), with the one-line
    message printed by the main process."""
    main = trainer.acc.is_main_process
    try:
        result = trainer.fit()
    except NonFiniteLossError as e:
        if main:
            print(f"{script}: error: {e}", file=sys.stderr)
        return None, 1
    if result.interrupted_by is not None:
        if main:
            print(f"{script}: stopped by signal {result.interrupted_by}; checkpoint saved to {result.checkpoint}; "
                  "rerun with resume=auto to continue", file=sys.stderr)
        return result, 128 + int(result.interrupted_by)
    return result, 0
