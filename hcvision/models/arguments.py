"""The keyword arguments a registered model takes, so that ``model_kwargs.NAME=V`` is checked before a run starts.

A model's arguments are those of its class's constructor, followed through ``**kwargs`` into the base classes (an
hcvision ViT takes its own ``connection``/``rate``/... and every argument of timm's ``VisionTransformer``), plus
those ``timm.create_model`` itself takes. A value is checked against the argument's annotation (bool, int, float,
str, tuples, ``Literal`` choices, ``Optional``); an argument without one is checked against its default's type.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from typing import Any, Dict, Mapping, Tuple

from ..cli import UsageError
from ..values import ConfigError, coerce_value

__all__ = ["model_arguments", "check_model_kwargs"]

# timm.create_model's own keywords that a config may set (the others take Python objects or are set by hcvision).
_CREATE_MODEL_ARGS: Dict[str, Any] = {"pretrained_cfg_overlay": Dict[str, Any], "scriptable": bool,
                                      "exportable": bool, "no_jit": bool}
# Set by the trainer itself, not by model_kwargs.
_RESERVED = ("pretrained", "pretrained_cfg", "checkpoint_path", "cache_dir")


def _annotation(cls: type, param: inspect.Parameter) -> Any:
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: use the default's type instead
        hints = {}
    tp = hints.get(param.name, inspect.Parameter.empty)
    if tp is inspect.Parameter.empty or tp is Any:
        default = param.default
        if isinstance(default, (bool, int, float, str)):
            return type(default)
        if isinstance(default, tuple):
            return Tuple[Any, ...]
        return Any
    return tp


@functools.lru_cache(maxsize=None)
def model_arguments(name: str) -> Dict[str, Any]:
    """``{argument: annotation}`` of the registered model ``name`` (built once on the meta device to find its class)."""
    from .loading import create_model

    cls = type(create_model(name, meta=True))
    found: Dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, _annotation(klass, p))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break  # nothing further is passed on to a base class
    for key, tp in _CREATE_MODEL_ARGS.items():
        found.setdefault(key, tp)
    for key in _RESERVED:
        found.pop(key, None)
    return found


def _accepts_config_value(tp: Any) -> bool:
    """Whether a YAML value (None, bool, number, str, list, mapping) can ever fit ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_config_value(a) for a in typing.get_args(tp))
    return tp in (Any, bool, int, float, str, type(None)) or origin in (tuple, dict, typing.Literal)


def _plain(tp: Any) -> Any:
    """``tp`` without the members a config value cannot take (callables, classes)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kept = tuple(a for a in typing.get_args(tp) if _accepts_config_value(a))
        return typing.Union[kept] if len(kept) > 1 else kept[0]
    return tp


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], key: str = "model_kwargs") -> Dict[str, Any]:
    """``kwargs`` checked against the arguments of the registered model ``name`` and converted to their types
    (lists to tuples, ints to floats); an unknown argument or a value of the wrong type is a :class:`UsageError`
    naming the close argument names or the accepted values."""

    arguments = model_arguments(name)
    checked: Dict[str, Any] = {}
    for arg, value in kwargs.items():
        if arg not in arguments:
            close = difflib.get_close_matches(arg, list(arguments), n=3, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else f"; accepted: {', '.join(sorted(arguments))}"
            raise UsageError(f"{key}.{arg} is not an argument of model={name!r}{hint}")
        tp = arguments[arg]
        if not _accepts_config_value(tp):
            raise UsageError(f"{key}.{arg} of model={name!r} takes a Python object ({tp}); it cannot be set from a "
                             "config or the command line")
        try:
            checked[arg] = coerce_value(f"{key}.{arg}", value, _plain(tp))
        except ConfigError as err:
            raise UsageError(str(err)) from None
    return checked
