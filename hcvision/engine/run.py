"""One training run from start to teardown, so that a task script keeps only its data, loss and evaluation.

    run = Run(cfg, "train_cls")                   # output_dir checked, accelerator, per-device batch, world size
    trainer = run.trainer(model, loader, loss_fn) # optimizer, fp32 EMA, prepare, resume validated, config, trackers
    result = run.fit(trainer)                     # None: stopped (run.exit_code says why)
    run.save_weights(metadata)                    # model.safetensors (+ model_ema.safetensors)
    run.write_results({...})                      # results.json + trackers
    run.close()                                   # trackers closed, Accelerate state released

:func:`train_main` parses the config and maps errors to exit codes through :func:`hcvision.cli.run_cli`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Type

import torch

from .. import io
from ..cli import OutOfSpaceError, is_main_rank, out_of_space, run_cli
from ..outputs import RunLock, check_writable
from ..provenance import run_provenance
from .accel import build_accelerator, per_device_batch_size, release_accelerator, seed_everything
from .checkpoint import CheckpointManager, check_output_dir, validate_resume
from .config import BaseTrainConfig, ConfigError, config_to_dict, parse_config, save_config
from .ema import create_ema
from .loop import FitResult, Trainer, build_optimizer, fit_to_exit_code

__all__ = ["Run", "train_main"]


class Run:
    """The plumbing every training script shares (see the module docstring)."""

    def __init__(self, cfg: BaseTrainConfig, name: str, *, writes: bool = True,
                 tensorboard: Optional[bool] = None) -> None:
        self.lock: Optional[RunLock] = None
        if writes:
            check_output_dir(cfg.output_dir, cfg.resume)
            check_writable(cfg.output_dir, "output_dir")
            if is_main_rank():  # one writer per run directory, before anything is written
                self.lock = RunLock(cfg.output_dir, "output_dir").acquire()
        try:
            self._setup(cfg, name, writes, tensorboard)
        except BaseException:  # a refused set-up leaves no lock file behind
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, cfg: BaseTrainConfig, name: str, writes: bool, tensorboard: Optional[bool]) -> None:
        self.cfg, self.name, self.writes = cfg, name, writes
        self.out = Path(cfg.output_dir)
        self.acc = build_accelerator(cfg, log_with_tensorboard=tensorboard if writes else False)
        self.batch_size = per_device_batch_size(cfg.global_batch_size, self.acc.num_processes, cfg.grad_accum_steps)
        self.exit_code = 0
        self.provenance = {**run_provenance(), "seed": cfg.seed, "num_processes": self.acc.num_processes,
                           "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]]}
        self.model: Optional[torch.nn.Module] = None
        self.ema: Any = None
        if self.acc.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        seed_everything(cfg.seed)  # same initial weights on every rank and for every rerun

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def _check_launch(self) -> None:
        """Say how many processes run and with which per-device batch; warn when a launcher asked for more."""
        n, env = self.acc.num_processes, os.environ
        asked = int(env.get("WORLD_SIZE", "1") or 1)
        # accelerate's simple launcher (used for --cpu and MULTI_CPU configs without a hostfile) sets MASTER_ADDR
        # when asked for several processes, but starts just one and no WORLD_SIZE.
        lone = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
        if not self.is_main:
            return
        print(f"{self.name}: {n} process(es) on {self.acc.device.type}, per-device batch {self.batch_size} "
              f"x {self.cfg.grad_accum_steps} accumulation = global batch {self.cfg.global_batch_size}",
              file=sys.stderr, flush=True)
        if asked > n or (lone and n == 1):
            print(f"{self.name}: warning: the launcher asked for {asked if asked > n else 'several'} processes but {n} "
                  "started (accelerate launch --cpu starts one); for CPU processes use torchrun --nproc_per_node N",
                  file=sys.stderr, flush=True)

    # -- set-up ------------------------------------------------------------------------------------
    def trainer(self, model: torch.nn.Module, train_loader: Any, loss_fn: Callable, *, evaluate_fn: Any = None,
                eval_loaders: Sequence[Any] = ()) -> Trainer:
        """Optimizer, EMA, ``prepare``, a validated resume, then the first writes: config.yaml and trackers."""
        cfg, acc = self.cfg, self.acc
        resume_dir = CheckpointManager(acc, cfg.output_dir).resolve(cfg.resume)
        if resume_dir is not None:
            validate_resume(resume_dir, model, cfg, ema=cfg.ema)  # everything a resume reads, before any write
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ConfigError(f"grad_checkpointing=true: model={cfg.model!r} has no set_grad_checkpointing (timm's "
                                  "API); accepted: grad_checkpointing=false for this model")
            model.set_grad_checkpointing(True)
        optimizer = build_optimizer(model, cfg)
        self.ema = create_ema(model, cfg.ema_decay, device=acc.device) if cfg.ema else None
        if cfg.compile:  # in place, after the EMA's copy: the EMA (evaluation, sampling) stays eager
            model.compile()
        if getattr(train_loader.dataset, "reads_own_shards", False):
            # A stream that reads this process's own shards (data.sources.ShardStream): onto the device as it is;
            # Accelerate's prepare would dispatch rank 0's stream or re-shard this one.
            from accelerate.data_loader import prepare_data_loader

            train_loader = prepare_data_loader(train_loader, acc.device, num_processes=1, process_index=0,
                                               put_on_device=True, dispatch_batches=False,
                                               non_blocking=acc.dataloader_config.non_blocking)
            model, optimizer, *eval_loaders = acc.prepare(model, optimizer, *eval_loaders)
        else:
            model, optimizer, train_loader, *eval_loaders = acc.prepare(model, optimizer, train_loader,
                                                                        *eval_loaders)
        self.model, self.eval_loaders = model, eval_loaders
        samples = len(train_loader.dataset) if isinstance(train_loader.dataset, Sized) else None
        if samples is not None and len(train_loader) == 0:  # after sharding, drop_last left no batch
            raise ConfigError(f"global_batch_size={cfg.global_batch_size} is larger than the {samples} training "
                              f"samples ({self.batch_size} per device x {acc.num_processes} processes per "
                              "micro-step); use a smaller batch")
        self._check_launch()
        if self.is_main:  # from here on the run writes into output_dir
            save_config(cfg, self.out / "config.yaml")
            io.write_json(self.out / "provenance.json", self.provenance)
        acc.init_trackers(self.name, config={k: v for k, v in config_to_dict(cfg).items()
                                             if isinstance(v, (int, float, str, bool))})
        trainer = Trainer(cfg, acc, model, optimizer, train_loader, loss_fn, ema=self.ema, evaluate_fn=evaluate_fn)
        trainer.logger.log({"world_size": acc.num_processes, "per_device_batch": self.batch_size}, 0)
        if trainer.resume(str(resume_dir) if resume_dir else None):
            self.print(f"resumed from {resume_dir} (epoch {trainer.state.epoch}, step {trainer.state.global_step})")
        return trainer

    def fit(self, trainer: Trainer) -> Optional[FitResult]:
        """Train; ``None`` when the run stopped early (non-finite loss, signal), with :attr:`exit_code` set.

        A run whose loss counted no sample at all (every file unreadable) is a :class:`ConfigError`: nothing was
        trained, so no weights or results follow.
        """
        t0 = time.perf_counter()
        result, self.exit_code = fit_to_exit_code(trainer, f"{self.name}.py")
        self.result, self.train_seconds = result, time.perf_counter() - t0
        if not self.exit_code and result.state.images_seen == 0:
            where = f" of data_dir={self.cfg.data_dir!r}" if hasattr(self.cfg, "data_dir") else ""
            raise ConfigError(f"no training sample{where} could be read; nothing was trained and no weights or "
                              "results are written")
        return None if self.exit_code else result

    # -- outputs -----------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def save_weights(self, metadata: Dict[str, str],
                     select: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> None:
        """Final ``model.safetensors`` and, with EMA, ``model_ema.safetensors`` (same metadata); collective.

        ``select`` picks the part of the trained module whose weights are written (e.g. the DiT inside a REPA
        wrapper, whose projector only serves training); checkpoints keep the whole module for exact resume.
        """
        if self.is_main:
            io.save_safetensors(select(self.unwrapped).state_dict(), self.out / "model.safetensors",
                                metadata=metadata)
            if self.ema is not None:
                io.save_safetensors(select(self.ema.module).state_dict(), self.out / "model_ema.safetensors",
                                    metadata=metadata)
        self.acc.wait_for_everyone()

    def write_results(self, results: Dict[str, Any], shown: Sequence[str] = ()) -> Dict[str, Any]:
        """``results.json`` with the run's common fields appended; numeric results go to the trackers too."""
        st = self.result.state
        results = {
            **results,
            "epochs": st.epoch,
            "global_step": st.global_step,
            "images_seen": st.images_seen,
            "images_per_sec": round(self.result.images_per_sec, 2),
            "train_seconds_this_session": round(self.train_seconds, 2),
            "num_processes": self.acc.num_processes,
            "per_device_batch": self.batch_size,
            "mixed_precision": self.cfg.mixed_precision,
            "provenance": self.provenance,
        }
        numeric = {f"final/{k}": v for k, v in results.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self.acc.log(numeric, step=st.global_step)
        if self.is_main:
            io.write_json(self.out / "results.json", results)
            print(json.dumps({k: results[k] for k in shown if k in results}), flush=True)
        self.acc.wait_for_everyone()
        return results

    def close(self) -> None:
        release_accelerator(self.acc)
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        """Close; a write that failed for want of space becomes one line naming the last complete checkpoint."""
        try:
            why = out_of_space(exc, self.out) if isinstance(exc, (OSError, RuntimeError)) else None
            if why:
                latest = io.find_checkpoints(self.out)
                path = exc.path if isinstance(exc, OutOfSpaceError) else getattr(exc, "filename", None) or self.out
                what = exc.what if isinstance(exc, OutOfSpaceError) else "the write failed"
                raise OutOfSpaceError(path, why, f"{what}; last complete checkpoint: "
                                      f"{str(latest[-1]) if latest else 'none'}",
                                      "free space (or copy output_dir where there is room) and rerun with "
                                      "resume=auto") from None
        finally:
            self.close()


def train_main(config_cls: Type[BaseTrainConfig], run: Callable[[Any], int], argv: Optional[Sequence[str]],
               prog: str) -> int:
    """``parse_config`` + ``run`` behind the one exit-code wrapper; ``-h`` / ``--help`` prints every key.

    From a command line, messages name the command as it was typed: ``python -m hcvision.train_cls``, the console
    script (``hcv-train-cls``) or the launcher (``train_cls.py``); called with ``argv``, they name ``prog``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is None and sys.argv[0]:
        module = sys.modules[run.__module__]
        as_module = Path(sys.argv[0]).resolve() == Path(module.__file__ or "").resolve()
        name = getattr(module.__spec__, "name", None) or run.__module__  # under -m the module is __main__
        prog = f"python -m {name}" if as_module else os.path.basename(sys.argv[0])
    if "-h" in args or "--help" in args:
        from .help import config_help

        doc = (sys.modules[run.__module__].__doc__ or "").strip().split("\n\n")[0]
        print(config_help(config_cls, prog, doc), end="")
        return 0
    return run_cli(lambda a: run(parse_config(config_cls, a)), args, prog)
