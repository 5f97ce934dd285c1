"""Typed, validated run configuration shared by the training scripts.

A run is described by a dataclass.  Values come, in increasing priority, from the dataclass
defaults, an optional YAML file and ``key=value`` overrides on the command line.  Every key is
checked: an unknown key names the closest valid one, a value of the wrong type names the type that
was expected, and each config's :meth:`BaseTrainConfig.validate` rejects out-of-range values with a
message that says what is accepted.  Dict-valued fields (``model_kwargs``) take dotted keys, e.g.
``model_kwargs.qk_norm=true``.

The classes here are generic: :class:`BaseTrainConfig` holds what every training loop needs
(optimisation, precision, checkpoints, logging).  Task scripts subclass it and add their own fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from ..cli import UsageError
from ..io import write_text
from ..resources import resolve_recipe
from ..values import ConfigError, coerce_value

__all__ = [
    "ConfigError",
    "require",
    "checked",
    "BaseTrainConfig",
    "parse_config",
    "load_yaml",
    "save_config",
    "config_to_dict",
    "coerce_value",
]

C = TypeVar("C", bound="BaseTrainConfig")

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "constant")
RESUME_HELP = "'' (start fresh), 'auto' (latest checkpoint in output_dir) or a checkpoint directory"


def checked(default: Any, ok: Callable[[Any], bool], accepted: str) -> Any:
    """A config field with its range: :meth:`BaseTrainConfig.validate` requires ``ok(value)`` and otherwise names
    ``accepted`` (``lr: float = checked(1e-3, lambda v: v > 0, "a number > 0")``)."""
    return field(default=default, metadata={"check": (ok, accepted)})


@dataclass
class BaseTrainConfig:
    """Fields every training loop of this project understands.

    Batch sizes are *global*: the per-device batch is ``global_batch_size / (num_processes *
    grad_accum_steps)`` so that the optimisation recipe does not change with the hardware.
    """

    RECIPES: ClassVar[str] = ""  # the packaged recipes' folder of this trainer (hcvision.resources): "cls", "dit"
    # The keys the user set in a file or on the command line (parse_config fills it): a default that a run's own
    # record can replace (eval_only takes the checkpoint's model) is replaced only when the user did not set it.
    given_keys: ClassVar[FrozenSet[str]] = frozenset()

    # -- model -------------------------------------------------------------------------------------
    model: str = checked("", bool, "a timm model name")  # any registered name (timm.list_models('*_dhc2'))
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # model_kwargs.NAME=V: timm.create_model(model, NAME=V)
    # -- run ---------------------------------------------------------------------------------------
    output_dir: str = checked("runs/default", bool, "a directory path")  # config, checkpoints, logs, weights, results
    seed: int = 0  # weights, data order, augmentation and noise all follow from it (resume is bit-exact)
    epochs: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    # > 0: stop after this many optimiser steps; the LR schedule still spans `epochs`
    max_steps: int = checked(0, lambda v: v >= 0, "an integer >= 0 (0: no limit)")
    resume: str = checked("", lambda v: v in ("", "auto") or os.path.isdir(v), RESUME_HELP)
    # -- optimisation ------------------------------------------------------------------------------
    global_batch_size: int = checked(128, lambda v: v >= 1, "an integer >= 1")  # over all processes and accumulation
    grad_accum_steps: int = checked(1, lambda v: v >= 1, "an integer >= 1")
    opt: str = "adamw"  # a timm optimizer name (timm.optim.list_optimizers())
    lr: float = checked(1e-3, lambda v: v > 0 and _finite(v), "a finite number > 0")  # peak learning rate
    betas: Tuple[float, float] = checked((0.9, 0.999), lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)")
    eps: float = checked(1e-8, lambda v: v > 0, "a number > 0")
    weight_decay: float = checked(0.05, lambda v: v >= 0, "a number >= 0")
    lr_schedule: str = checked("cosine", lambda v: v in LR_SCHEDULES, f"one of {LR_SCHEDULES}")
    warmup_steps: int = checked(0, lambda v: v >= 0, "an integer >= 0")  # linear warm-up, in optimiser steps
    min_lr: float = 0.0  # in [0, lr]
    clip_grad: float = checked(0.0, lambda v: v >= 0, "a number >= 0 (0 disables clipping)")
    # LR multiplier for connection parameters (HC/FC/mHC)
    connection_lr_scale: float = checked(1.0, lambda v: v > 0 and _finite(v), "a finite number > 0")
    # layer-wise LR decay (BEiT; timm's --layer-decay): block i of L gets lr * layer_decay^(L - i); 1 = off
    layer_decay: float = checked(1.0, lambda v: 0 < v <= 1, "a number in (0, 1] (1: off; ViT fine-tuning: 0.65-0.75)")
    # -- run: precision and hardware ---------------------------------------------------------------
    mixed_precision: str = checked("no", lambda v: v in MIXED_PRECISION, f"one of {MIXED_PRECISION}")
    compile: bool = False  # torch.compile the trained model's forward in place (names, checkpoints, EMA unchanged)
    grad_checkpointing: bool = False  # recompute each block in backward (timm's set_grad_checkpointing): less memory
    num_workers: int = checked(0, lambda v: v >= 0, "an integer >= 0")
    # torch intra-op threads when training on CPU; 0 = torch's default (one per core)
    cpu_threads: int = checked(0, lambda v: v >= 0, "an integer >= 0 (0: default)")
    # -- optimisation: EMA -------------------------------------------------------------------------
    ema: bool = False  # keep an fp32 exponential moving average of the weights (model_ema.safetensors)
    ema_decay: float = checked(0.9999, lambda v: 0 < v < 1, "a number in (0, 1)")
    # -- run: checkpoints and logging --------------------------------------------------------------
    # optimiser steps between checkpoints; 0: only at epoch ends
    checkpoint_every: int = checked(0, lambda v: v >= 0, "an integer >= 0")
    keep_checkpoints: int = checked(2, lambda v: v >= 1, "an integer >= 1")
    log_every: int = checked(10, lambda v: v >= 1, "an integer >= 1")
    diagnostics: bool = True  # connection diagnostics (hcvision.analysis.diagnostics) every log_every steps
    tensorboard: bool = True  # TensorBoard logs in output_dir/tb (metrics.jsonl is always written)
    progress_bar: bool = True  # a tqdm bar on rank 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values outside their accepted range: first each :func:`checked` field,
        then what depends on several fields (subclasses extend this)."""
        for name, (ok, accepted) in _field_checks(type(self)).items():
            value = getattr(self, name)
            require(ok(value), name, list(value) if isinstance(value, tuple) else value, accepted)
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        # The optimizer factory validates names itself, but only after the model was built: check early.
        from timm.optim import list_optimizers

        known = list_optimizers()
        if self.opt.lower() not in known:
            raise ConfigError(f"opt={self.opt!r} is not a timm optimizer{_suggest(self.opt, known)}")
        self.model_kwargs = checked_model_kwargs(self.model, self.model_kwargs)


def checked_model_kwargs(model: str, kwargs: Dict[str, Any], key: str = "model_kwargs") -> Dict[str, Any]:
    """``kwargs`` checked against the arguments of ``model`` (:func:`hcvision.models.arguments.check_model_kwargs`),
    when ``model`` is a registered name (an unknown name is reported by the trainer, with close names)."""
    import timm

    import hcvision.models  # noqa: F401  (registers the families)

    from ..models.arguments import check_model_kwargs

    if not kwargs or not timm.is_model(model):
        return dict(kwargs)
    try:
        return check_model_kwargs(model, kwargs, key)
    except UsageError as err:
        raise ConfigError(str(err)) from None


def _field_checks(cls: type) -> Dict[str, Tuple[Callable[[Any], bool], str]]:
    """Each field's check, the most derived one: a subclass that only changes a default (``epochs: int = 100``)
    keeps the range its base declared."""
    checks: Dict[str, Tuple[Callable[[Any], bool], str]] = {}
    for klass in reversed(cls.__mro__):
        for f in getattr(klass, "__dataclass_fields__", {}).values():
            if "check" in f.metadata:
                checks[f.name] = f.metadata["check"]
    return checks


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid; expected {accepted}")


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _parse_override(arg: str) -> Tuple[str, Any]:
    if "=" not in arg:
        raise ConfigError(f"argument {arg!r} is not of the form key=value")
    key, raw = arg.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"argument {arg!r} has an empty key")
    try:
        # YAML gives `true` -> bool, `3` -> int, `[1, 2]` -> list; `3e-3` stays a str (coerced later).
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply(values: Dict[str, Any], key: str, value: Any, hints: Dict[str, Any], names: Sequence[str]) -> None:
    top, _, sub = key.partition(".")
    if top not in hints:
        raise ConfigError(f"unknown config key {top!r}{_suggest(top, names)}")
    tp = hints[top]
    if sub:
        if typing.get_origin(tp) not in (dict, Dict):
            raise ConfigError(f"config key {top!r} is not a mapping, so {key!r} is not valid")
        current = dict(values.get(top) or {})
        _set_nested(current, sub.split("."), value)
        values[top] = current
    else:
        values[top] = coerce_value(top, value, tp)


def _set_nested(d: Dict[str, Any], parts: Sequence[str], value: Any) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def parse_config(cls: Type[C], argv: Sequence[str] = (), *, defaults: Optional[Dict[str, Any]] = None) -> C:
    """Build a validated ``cls`` from ``[--config FILE] [key=value ...]``.

    ``defaults`` (e.g. the demo recipe used when no argument is given) sits between the dataclass
    defaults and the YAML file.
    """
    argv = list(argv)
    config_files = []
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file or a recipe name")
            config_files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            config_files.append(arg.split("=", 1)[1])
        else:
            overrides.append(_parse_override(arg))
        i += 1

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    renamed = getattr(cls, "RENAMED_KEYS", {})  # {old key: current key}: old recipes and commands keep working
    values: Dict[str, Any] = {}
    layers = [list((defaults or {}).items())]
    for path in config_files:
        try:
            path = resolve_recipe(path, cls.RECIPES)
        except UsageError as err:
            raise ConfigError(str(err)) from None
        layers.append(list(load_yaml(path).items()))
    layers.append(overrides)
    for layer in layers:
        for key, value in layer:
            top = key.split(".")[0]
            if top in renamed:
                print(f"warning: config key {top!r} is deprecated; use {renamed[top]!r}", file=sys.stderr)
                key = renamed[top] + key[len(top):]
            if isinstance(value, dict) and "." not in key and key in hints \
                    and typing.get_origin(hints[key]) in (dict, Dict):
                # A mapping in YAML merges into what earlier layers set (model_kwargs from a file + CLI).
                for k, v in value.items():
                    _apply(values, f"{key}.{k}", v, hints, names)
                if not value:
                    values[key] = {}
            else:
                _apply(values, key, value, hints, names)
    cfg = cls(**values)
    cfg.given_keys = frozenset(renamed.get(top, top) for layer in layers[1:] for top in (k.partition(".")[0]
                                                                                       for k, _ in layer))
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain-python view of a config (tuples become lists so YAML stays portable)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
