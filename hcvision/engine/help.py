"""``--help`` of the trainers, generated from their config dataclasses (there is no second list of keys to keep).

A key's type and default come from the dataclass field, its accepted values from :func:`~.config.checked`, its
description from the field's ``help`` metadata (settings declared once elsewhere, such as the sampling spec's) and the
comment on the field's line (or the comment lines just above it), and its group from the
section comment it sits under (``# -- data ---``). A subclass that only changes a default keeps the group and the
description of the base's declaration unless it writes its own comment.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io as _io
import re
import textwrap
import tokenize
import types
import typing
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..resources import list_recipes
from .config import _field_checks

__all__ = ["GROUPS", "KeyHelp", "config_keys", "config_help"]

# The groups --help shows, in this order; a section comment must start with one of them (``# -- run: EMA ---``).
GROUPS = ("model", "data", "optimisation", "diffusion", "evaluation", "run")
_SECTION = re.compile(r"#\s*--\s*([A-Za-z]+)")


class KeyHelp(NamedTuple):
    name: str
    group: str
    type: str
    default: str
    accepted: str
    text: str


def _declarations(klass: type) -> Dict[str, Tuple[Optional[str], str]]:
    """Field name -> (section group or None, comment) as written in ``klass``'s own source."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (a frozen app): keys still list, without descriptions
        return {}
    comments: Dict[int, str] = {}
    for tok in tokenize.generate_tokens(_io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    lines = source.splitlines()
    body = ast.parse(source).body[0]
    out: Dict[str, Tuple[Optional[str], str]] = {}
    group: Optional[str] = None
    previous_end = body.lineno
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = getattr(node, "end_lineno", previous_end)
            continue
        above: List[str] = []
        for line_no in range(previous_end + 1, node.lineno):
            text = comments.get(line_no, "")
            section = _SECTION.match(text)
            if section:
                group, above = section.group(1).lower(), []
            elif text and lines[line_no - 1].lstrip().startswith("#"):
                above.append(text.lstrip("# ").strip())
        trailing = comments.get(node.end_lineno, "")
        text = " ".join(filter(None, [*above, trailing.lstrip("# ").strip()]))
        out[node.target.id] = (group, text)
        previous_end = node.end_lineno
    return out


def _type_text(tp: object) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, typing.Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_text(args[0])}, ...]"
        return "list[" + ", ".join(_type_text(a) for a in args) + "]"
    if origin in (dict, typing.Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    return "''" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def config_keys(cls: type) -> List[KeyHelp]:
    """Every key of the config class ``cls`` with its group, type, default, accepted values and description."""
    hints = typing.get_type_hints(cls)
    declared: Dict[str, Tuple[Optional[str], str]] = {}
    for klass in reversed(cls.__mro__):  # base first: a subclass overrides a description, not the group
        if not dataclasses.is_dataclass(klass):
            continue
        for name, (group, text) in _declarations(klass).items():
            base_group, base_text = declared.get(name, (None, ""))
            declared[name] = (base_group or group, text or base_text)
    checks = _field_checks(cls)  # a subclass that changes a default keeps the base's range
    keys = []
    for f in dataclasses.fields(cls):
        group, text = declared.get(f.name, (None, ""))
        if f.metadata.get("help"):  # a setting declared elsewhere with its own help (hcvision.sampling_spec)
            text = f"{f.metadata['help']}; {text}" if text else f.metadata["help"]
        accepted = checks[f.name][1] if f.name in checks else ""
        keys.append(KeyHelp(f.name, group if group in GROUPS else "run", _type_text(hints[f.name]),
                            _default_text(f), accepted, text))
    return keys


def config_help(cls: type, prog: str, summary: str = "") -> str:
    """The text ``--help`` prints for a trainer whose config class is ``cls``."""
    recipes = ", ".join(list_recipes(cls.RECIPES)) or "(none packaged)"
    parts = [
        f"usage: {prog} [--config RECIPE|FILE ...] [key=value ...]",
        "",
        *([summary, ""] if summary else []),
        "How a run is configured (later wins): the defaults below < each --config < key=value.",
        "  --config RECIPE|FILE   a YAML file of `key: value` lines, or the name of a recipe shipped with hcvision:",
        *textwrap.wrap(recipes, 110, initial_indent="                         ",
                       subsequent_indent="                         "),
        "  key=value              any key below; values are YAML (true, 3, 1e-3, [0.9, 0.999], '' for empty)",
        "  model_kwargs.NAME=V    an argument of the model's constructor or of timm.create_model, checked against",
        "                         them before anything is written (e.g. model_kwargs.qk_norm=true, "
        "model_kwargs.drop_path_rate=0.1)",
        "  -h, --help             this text",
        "Exit codes: 0 done, 1 non-finite loss, 2 bad input (one line on stderr), 128+N stopped by signal N",
        "(rerun with resume=auto to continue).",
    ]
    keys = config_keys(cls)
    width = max(len(k.name) for k in keys) + 2
    for group in GROUPS:
        members = [k for k in keys if k.group == group]
        if not members:
            continue
        parts += ["", f"{group}:"]
        for k in members:
            head = f"  {k.name:<{width}}{k.type}, default {k.default}"
            if k.accepted:
                head += f"; accepted: {k.accepted}"
            parts.append(head)
            if k.text:
                parts += textwrap.wrap(k.text, 116, initial_indent=" " * (width + 2),
                                       subsequent_indent=" " * (width + 2))
    return "\n".join(parts) + "\n"
