"""Table-driven timm registration shared by the model families.

Each family calls :func:`register_variants` once with its sizes; every (size, connection kind, rate) becomes a proper
timm entrypoint with a name, a docstring and a default cfg, without a hundred hand-written builder functions.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable

from timm.models import generate_default_cfgs, register_model

from ..connections import KindRecord, kind_records, kinds
from ..resources import weights_dir

__all__ = ["connection_variants", "register_variants", "weights_dir", "local_weights", "variant_cfgs"]


def connection_variants(records: Iterable[KindRecord] | None = None) -> list[tuple[str, str, int]]:
    """(name suffix, connection kind, rate) for every kind of the table and each of its zoo rates, e.g.
    ``("res", "residual", 1)``, ``("dhc2", "dhc", 2)``. For FC kinds the number is m, the count of fractions."""
    return [(r.suffix(n), r.name, n) for r in (kind_records() if records is None else records) for n in r.zoo_rates]


def local_weights() -> dict[str, dict[str, Any]]:
    """``{"arch.tag": entry}`` from ``weights/index.json``, keeping only entries whose file exists."""
    index = weights_dir() / "index.json"
    if not index.is_file():
        return {}
    try:
        entries = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{index} is not a valid weights index (JSON object of 'arch.tag' -> entry): {err}") from err
    if not isinstance(entries, dict):
        raise ValueError(f"{index} must hold a JSON object of 'arch.tag' -> entry, got {type(entries).__name__}")
    found = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            continue  # an entry without a weights file lists nothing (and is never advertised)
        path = weights_dir() / entry["file"]
        if path.is_file():
            found[name] = dict(entry, file=str(path))
    return found


def register_variants(
    module_name: str,
    sizes: dict[str, dict[str, Any]],
    create: Callable[..., Any],
    describe: Callable[[str, str, int], str],
    size_cfg: Callable[[str], dict[str, Any]],
) -> list[str]:
    """Register ``{size}_{suffix}`` for every size and connection variant; return the names.

    ``create(variant_name, pretrained, **kwargs)`` builds the model; the size's arguments and the variant's
    ``connection``/``rate`` come first so that user keyword arguments override them. A kind registered later
    (:func:`hcvision.connections.kinds.register`) is registered for every size at once, with ``size_cfg(size)`` as
    its default cfg, and its names are appended to the returned list.
    """
    module = sys.modules[module_name]
    names: list[str] = []

    def add(variants: Iterable[tuple[str, str, int]]) -> None:
        for size, size_args in sizes.items():
            for suffix, kind, rate in variants:
                name = f"{size}_{suffix}"

                def entrypoint(pretrained: bool = False, _name=name,
                               _defaults=dict(size_args, connection=kind, rate=rate), **kwargs: Any):
                    return create(_name, pretrained, **dict(_defaults, **kwargs))

                entrypoint.__name__ = entrypoint.__qualname__ = name
                entrypoint.__module__ = module_name
                entrypoint.__doc__ = describe(size, kind, rate)
                if name not in module.default_cfgs:  # a kind added after the module's default_cfgs were made
                    module.default_cfgs.update(generate_default_cfgs({name: size_cfg(size)}))
                setattr(module, name, entrypoint)
                register_model(entrypoint)
                names.append(name)

    add(connection_variants())
    kinds.on_register(lambda record: add(connection_variants([record])))
    return names


def variant_cfgs(sizes: Iterable[str], size_cfg: Callable[[str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One default cfg per registered name, plus an ``arch.tag`` cfg for every local weights file that exists."""
    cfgs: dict[str, dict[str, Any]] = {}
    for size in sizes:
        for suffix, _, _ in connection_variants():
            cfgs[f"{size}_{suffix}"] = size_cfg(size)
    for tagged, entry in local_weights().items():
        arch = tagged.split(".")[0]
        if arch in cfgs:
            cfgs[tagged] = dict(cfgs[arch], file=entry["file"])
            if "num_classes" in entry:
                cfgs[tagged]["num_classes"] = entry["num_classes"]
    return cfgs
