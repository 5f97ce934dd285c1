"""Atomic training checkpoints, exact-resume state and weight export.

Layout of ``output_dir``::

    config.yaml               resolved config
    checkpoints/step_00000120/  Accelerate state (model.safetensors, optimizer.bin, RNG states)
                                + train_state.json + ema.safetensors (when EMA is on)
    model.safetensors         final weights (timm-loadable)

A checkpoint directory is written under a temporary name and renamed when complete, so a crash
never leaves a half-written ``step_*`` directory behind and ``resume=auto`` never picks one up.
The EMA weights are stored with safetensors rather than through ``register_for_checkpointing``,
which Accelerate reloads with ``torch.load(weights_only=False)`` (unpickling).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .. import io
from ..cli import OutOfSpaceError, out_of_space
from .config import ConfigError

__all__ = ["TrainState", "CheckpointManager", "check_output_dir", "validate_resume"]

RUN_MARKERS = ("config.yaml", "checkpoints", "results.json", "model.safetensors", "metrics.jsonl")


@dataclass
class TrainState:
    """Loop position, tracked by us (Accelerate's own step counts accumulation micro-steps)."""

    global_step: int = 0  # optimiser steps taken
    micro_step: int = 0  # batches consumed (all epochs); seeds each step's randomness
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # batches of `epoch` already consumed
    images_seen: int = 0  # global count, all ranks

    def to_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, int]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})

    @classmethod
    def read(cls, path: Path) -> "TrainState":
        """Parse ``train_state.json``; a damaged or foreign file is a :class:`ConfigError` naming it."""
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {type(raw).__name__}, not an object")
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            state = cls.from_dict(raw)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{str(path)!r} is not a readable train state ({err}); accepted: the train_state.json "
                              "a run wrote (resume from an earlier checkpoint or start a new output_dir)") from None
        if min(dataclasses.astuple(state)) < 0:
            raise ConfigError(f"{str(path)!r} holds negative counters {state.to_dict()}")
        return state


def check_output_dir(output_dir: Union[str, Path], resume: str) -> None:
    """Refuse to write into a directory that holds another run unless resuming it."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} exists and is not a directory")
    if resume or not out.is_dir():
        return
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if found:
        raise ConfigError(
            f"output_dir={str(out)!r} already holds a run ({', '.join(found)}); "
            "pass resume=auto to continue it or choose another output_dir"
        )


class CheckpointManager:
    """Save/find/load checkpoints of one run; collective calls must be made on every rank."""

    def __init__(self, accelerator, output_dir: Union[str, Path], keep: int = 2) -> None:
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    # -- discovery -------------------------------------------------------------------------------
    def list(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        return io.find_checkpoints(self.root.parent)

    def latest(self) -> Optional[Path]:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def resolve(self, resume: str) -> Optional[Path]:
        """Map the ``resume`` config value to a checkpoint directory (or ``None``)."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "train_state.json").is_file():
            raise ConfigError(f"resume={resume!r} is not a checkpoint directory (no train_state.json)")
        return path

    # -- save / load -----------------------------------------------------------------------------
    def save(self, state: TrainState, ema_state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
        """Write a checkpoint for ``state`` atomically; returns its final path."""
        acc = self.accelerator
        final = self.root / f"step_{state.global_step:08d}"
        tmp = self.root / f".tmp-step_{state.global_step:08d}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over from a crash during a previous save
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            io.failpoint("checkpoint.state_saved", tmp)
            if acc.is_main_process:
                if ema_state is not None:
                    io.save_safetensors(ema_state, tmp / "ema.safetensors")
                io.write_json(tmp / "train_state.json", state.to_dict())
        except (OSError, RuntimeError) as err:
            why = out_of_space(err, self.root)
            if not why:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint, so the space comes back
            raise OutOfSpaceError(tmp, why, "the partial checkpoint was removed") from None
        # save_state has no barrier at its end (PITFALLS): every rank's RNG file must be on disk first.
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # same step saved twice (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            io.failpoint("checkpoint.before_rename")
            os.replace(tmp, final)
            io.failpoint("checkpoint.renamed")
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Union[str, Path]) -> "tuple[TrainState, Optional[Dict[str, torch.Tensor]]]":
        """Restore Accelerate state from ``path``; return our loop state and EMA tensors if saved."""
        path = Path(path)
        self.accelerator.load_state(str(path))
        state = TrainState.read(path / "train_state.json")
        ema_file = path / "ema.safetensors"
        ema = io.load_weights(ema_file, what="EMA weights")[0] if ema_file.is_file() else None
        return state, ema


def _fit_error(state: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> Optional[str]:
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"missing {', '.join(missing[:3])}" if missing else "",
             f"unexpected {', '.join(extra[:3])}" if extra else "",
             f"shapes differ: {', '.join(shapes[:3])}" if shapes else ""]
    return "; ".join(p for p in parts if p) or None


OPTIMIZER_KEYS = ("opt", "layer_decay", "connection_lr_scale")


def validate_resume(path: Union[str, Path], model: torch.nn.Module, cfg: Any, ema: bool) -> None:
    """Read everything a resume from ``path`` will load and check that it fits this run, before any write.

    A truncated optimizer file, garbage ``train_state.json``, weights of another model (another output_dir, or a
    ``train_dit.py`` run resumed by ``train_cls.py``) or NaN weights are a :class:`ConfigError` naming the file.
    """
    from accelerate.utils import load as accelerate_load

    path = Path(path)
    TrainState.read(path / "train_state.json")
    recorded = Path(cfg.output_dir) / "config.yaml"
    if recorded.is_file():
        import yaml

        try:
            previous = yaml.safe_load(recorded.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{str(recorded)!r} is not readable YAML ({str(err).splitlines()[0]})") from None
        if isinstance(previous, dict) and previous.get("model") not in (None, cfg.model):
            raise ConfigError(f"resume={cfg.resume!r}: {str(recorded)!r} records model={previous.get('model')!r}, "
                              f"not model={cfg.model!r}; resume with the same model or choose another output_dir")
        # These decide the optimizer's parameter groups, which the saved optimizer state must match.
        for key in OPTIMIZER_KEYS:
            if isinstance(previous, dict) and key in previous and previous[key] != getattr(cfg, key, previous[key]):
                raise ConfigError(f"resume={cfg.resume!r}: {str(recorded)!r} records {key}={previous[key]!r}, not "
                                  f"{key}={getattr(cfg, key)!r}, and the saved optimizer state has that run's "
                                  f"parameter groups; resume with {key}={previous[key]!r} or choose another output_dir")
    target = model.state_dict()
    files = [("model.safetensors", "model weights")] + ([("ema.safetensors", "EMA weights")] if ema else [])
    for name, what in files:
        file = path / name
        if name == "model.safetensors" and not file.is_file():
            raise ConfigError(f"checkpoint {str(path)!r} has no {name}; accepted: a checkpoints/step_* directory "
                              "written by this project's trainers")
        if not file.is_file():
            continue
        state = io.load_weights(file, what=what)[0]
        problem = _fit_error(state, target)
        if problem:
            raise ConfigError(f"{str(file)!r} does not fit model={cfg.model!r} ({problem}); it belongs to another "
                              "model or run: resume with the model it was trained as or choose another output_dir")
        io.check_finite(state, f"{what} {str(file)!r}")
    for file in sorted(path.glob("optimizer*.bin")) + sorted(path.glob("random_states_*.pkl")) \
            + sorted(path.glob("sampler*.bin")):
        try:
            accelerate_load(file, map_location="cpu")
        except Exception as err:  # truncated or foreign file; accelerate's loader refuses arbitrary pickles
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{str(file)!r} is damaged or not a training state ({first}); resume from an earlier "
                              "checkpoint (pass resume=<its directory>) or start a new output_dir") from None
