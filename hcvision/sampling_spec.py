"""The sampling settings, each declared once: name, default, range, help and the names it had before.

SiT's ``parse_sde_args`` idea: one declaration, many readers. :class:`SamplingSpec` is a small frozen dataclass; each
of its fields is one setting made by :func:`setting`. Everything that takes or records a sampling setting derives
from it:

* train_dit's config fields (:func:`config_field`: same name, range and help; the demo's own default),
* the sampling CLI's options (:func:`add_arguments`; ``--sampling-steps``, ``--guidance-scale``, ...),
* the weights' metadata (:meth:`SamplingSpec.to_metadata` / :func:`read_settings`),
* the provenance of a results file (:func:`hcvision.eval.provenance_fields`) and the evaluation CLI's options,
* the diffusers pipeline's keyword arguments.

Old names (``cfg_scale``, ``eval_steps``, ``--scheduler``, ``--steps``, ...) are accepted where users had them, with a
deprecation message naming the new one. This module is a leaf (it imports no torch): the evaluation side imports it
without importing the samplers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .cli import UsageError

__all__ = [
    "DDPM_SAMPLERS", "FLOW_SAMPLERS", "SAMPLERS", "DEFAULT_SAMPLER", "SamplingSpec", "setting", "settings",
    "config_field", "add_arguments", "settings_from_args", "read_settings", "renamed", "renamed_config_keys",
    "check_setting",
]

# The samplers of each objective (hcvision.diffusion.sampling implements them) and each objective's default:
# DiT evaluates with 250 ancestral DDPM steps; SiT's and REPA's headline FIDs use the 250-step SDE sampler.
DDPM_SAMPLERS: Tuple[str, ...] = ("ddpm", "ddim", "dpmsolver++")
FLOW_SAMPLERS: Tuple[str, ...] = ("euler", "heun", "sde")
SAMPLERS: Dict[str, Tuple[str, ...]] = {"ddpm": DDPM_SAMPLERS, "flow": FLOW_SAMPLERS}
DEFAULT_SAMPLER: Dict[str, str] = {"ddpm": "ddpm", "flow": "sde"}
_ALL_SAMPLERS = ", ".join(f"{n} ({o})" for o, names in SAMPLERS.items() for n in names)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def setting(default: Any, ok: Callable[[Any], bool], accepted: str, help: str, *, old_names: Tuple[str, ...] = (),
            metavar: Optional[Tuple[str, ...]] = None) -> Any:
    """One sampling setting as a dataclass field: its default, its range (``ok`` and the words ``accepted``, the
    ``"check"`` metadata that :meth:`hcvision.engine.BaseTrainConfig.validate` reads too), its help and the names it
    had before."""
    return field(default=default, metadata={"check": (ok, accepted), "help": help, "old_names": old_names,
                                            "metavar": metavar})


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample a DiT. Defaults are DiT's evaluation (250 steps, guidance 1.5 on 3 of 4 latent channels)."""

    sampler: str = setting(
        "", lambda v: v == "" or any(v in names for names in SAMPLERS.values()),
        f"'' (the objective's default: ddpm for DDPM, sde for flow) or one of {_ALL_SAMPLERS}",
        "sampler; '' = the objective's default (ddpm for DDPM models, sde for flow models)",
        old_names=("scheduler", "eval_scheduler"))
    sampling_steps: int = setting(
        250, lambda v: _is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]",
        "sampling steps (heun evaluates the model 2N - 1 times)", old_names=("steps", "eval_steps"))
    guidance_scale: float = setting(
        1.5, lambda v: _is_number(v) and v >= 0, "a finite number >= 0 (1: no guidance)",
        "classifier-free guidance scale (1: none; needs a model trained with label dropout)",
        old_names=("cfg_scale",))
    guidance_channels: int = setting(
        0, lambda v: _is_int(v) and v >= 0, "0 (automatic) or an integer k >= 1",
        "guide the first k prediction channels; 0 = automatic (3 of 4 latent channels as DiT, else all)")
    guidance_interval: Tuple[float, float] = setting(
        (0.0, 1.0), lambda v: len(v) == 2 and all(_is_number(x) for x in v) and 0 <= v[0] <= v[1] <= 1,
        "two numbers 0 <= LO <= HI <= 1",
        "guide only at noise levels t in [LO, HI] (0 = data, 1 = noise; REPA: 0 0.7)", metavar=("LO", "HI"))
    diffusion_norm: float = setting(
        1.0, lambda v: _is_number(v) and v >= 0, "a finite number >= 0",
        "the sde sampler's diffusion coefficient w_t = norm * t (SiT: 1, REPA: 2); other samplers ignore it")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))

    def for_objective(self, objective: str, key: str = "sampler") -> "SamplingSpec":
        """The spec with ``sampler`` '' replaced by the objective's default; a sampler of another objective is a
        :class:`UsageError` naming ``key``."""
        if objective not in SAMPLERS:
            raise UsageError(f"objective={objective!r} is not valid; accepted: {', '.join(SAMPLERS)}")
        if not self.sampler:
            return dataclasses.replace(self, sampler=DEFAULT_SAMPLER[objective])
        if self.sampler not in SAMPLERS[objective]:
            raise UsageError(f"{key}={self.sampler!r} does not sample a {objective} model; accepted: "
                             f"{', '.join(SAMPLERS[objective])}")
        return self

    def to_metadata(self) -> Dict[str, str]:
        """The settings as safetensors string metadata: the sampler as it is, the others as JSON."""
        return {name: value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple)
                                                                       else value)
                for name, value in dataclasses.asdict(self).items()}


def settings() -> Tuple[dataclasses.Field, ...]:
    """The declarations, in order."""
    return dataclasses.fields(SamplingSpec)


_FIELDS = {f.name: f for f in dataclasses.fields(SamplingSpec)}
_OLD = {old: f.name for f in dataclasses.fields(SamplingSpec) for old in f.metadata["old_names"]}


def check_setting(name: str, value: Any, key: Optional[str] = None) -> Any:
    """``value`` checked (and a list made a tuple, an integral float of an int setting an int) for setting ``name``;
    otherwise a :class:`UsageError` naming ``key`` (default: ``name``) and what is accepted."""
    f = _FIELDS[name]
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(f.default, int) and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(f.default, float) and _is_int(value):
        value = float(value)
    if isinstance(f.default, tuple) and isinstance(value, tuple) and all(_is_int(x) for x in value):
        value = tuple(float(x) for x in value)
    ok, accepted = f.metadata["check"]
    try:
        good = isinstance(value, type(f.default)) and ok(value)
    except TypeError:
        good = False
    if not good:
        raise UsageError(f"{key or name}={list(value) if isinstance(value, tuple) else value!r} is not valid; "
                         f"accepted: {accepted}")
    return value


def renamed(name: str, where: str = "") -> str:
    """The current name of setting ``name`` (an old name prints a deprecation message to stderr once per call)."""
    new = _OLD.get(name)
    if new is None:
        return name
    print(f"{where + ': ' if where else ''}warning: {name!r} is deprecated; use {new!r}", file=sys.stderr)
    return new


def renamed_config_keys() -> Dict[str, str]:
    """``{old config key: setting}`` for the names train_dit's config had (``eval_scheduler``, ``eval_steps``,
    ``cfg_scale``): a config class's ``RENAMED_KEYS``, which :func:`hcvision.engine.parse_config` accepts with a
    warning."""
    return {old: new for old, new in _OLD.items() if old.startswith("eval_") or old == "cfg_scale"}


def config_field(name: str, default: Any = dataclasses.MISSING) -> Any:
    """A config field for setting ``name``: its range and help, with ``default`` (else the spec's)."""
    f = _FIELDS[name]
    return field(default=f.default if default is dataclasses.MISSING else default, metadata=dict(f.metadata))


# ------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------
def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Deprecated(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {_option(self.dest)}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_arguments(parser: Any, defaults: str = "default:") -> None:
    """One option per setting (``--sampler``, ``--sampling-steps``, ...; default None: "not given"), each old name an
    option that still works and says it is deprecated. Each help text ends with ``defaults`` and the spec's default
    (what "not given" means)."""
    for f in settings():
        kind = type(f.default[0]) if isinstance(f.default, tuple) else type(f.default)
        nargs = len(f.default) if isinstance(f.default, tuple) else None
        shown = list(f.default) if isinstance(f.default, tuple) else f.default
        common = dict(dest=f.name, type=kind, nargs=nargs, default=None, metavar=f.metadata["metavar"])
        parser.add_argument(_option(f.name), help=f"{f.metadata['help']} ({defaults} {shown!r})", **common)
        for old in f.metadata["old_names"]:
            if old.startswith("eval_"):  # a config key of train_dit, never an option
                continue
            parser.add_argument(_option(old), action=_Deprecated, help=argparse.SUPPRESS, **common)


def settings_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings given on a command line made by :func:`add_arguments`, checked (``{}`` when none)."""
    out = {}
    for f in settings():
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = check_setting(f.name, value, _option(f.name))
    return out


def read_settings(metadata: Mapping[str, str], source: str) -> Dict[str, Any]:
    """The settings recorded in a weights file's metadata, checked (a malformed one is a :class:`UsageError` naming
    ``source`` and the key). Files written before these names record ``sampling_steps`` and ``cfg_scale``, and
    ``guidance_channels`` ``""`` for automatic."""
    out = {}
    for key, text in metadata.items():
        name = _OLD.get(key, key) if key == "cfg_scale" else key
        if name not in _FIELDS:
            continue
        f = _FIELDS[name]
        try:
            if isinstance(f.default, str):
                value: Any = text
            elif name == "guidance_channels" and text == "":
                value = 0
            else:
                value = json.loads(text)
            out[name] = check_setting(name, value, f"{source}: metadata {key}")
        except (ValueError, UsageError) as err:
            if isinstance(err, UsageError):
                raise
            raise UsageError(f"{source}: metadata {key}={text!r} is not valid; accepted: "
                             f"{f.metadata['check'][1]}") from None
    return out
