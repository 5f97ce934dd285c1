"""Typed values from text: the one coercion that the run configs and the model arguments share.

A value comes from YAML or from ``key=value`` on a command line (YAML-parsed); :func:`coerce_value` converts it to
an annotated type (bool, int, float, str, tuples, mappings, ``Optional``, ``Union``, ``Literal``) or raises
:class:`ConfigError` naming the key and the expected type.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Dict, Literal, Tuple, Union

import yaml

from .cli import UsageError

__all__ = ["ConfigError", "coerce_value"]


class ConfigError(UsageError):
    """A user-facing configuration error; the message is one line and names the bad value."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin in (dict, Dict):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "int", float: "float", bool: "bool (true/false)", str: "str"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce_value(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise :class:`ConfigError`.

    Numbers are accepted from strings because YAML 1.1 reads ``3e-3`` as a string.  ``bool`` is
    never accepted where a number is expected (``True`` is an ``int`` to Python, not to a user).
    """
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce_value(key, value, arg)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(coerce_value(key, v, a) for v, a in zip(value, args))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `resume=1` is unusual but harmless to keep as text
        raise bad
    raise TypeError(f"unsupported config field type {tp!r} for {key}")
