"""The files hcvision ships inside the package: the recipes (``configs/``) and the weights it trained (``weights/``).

In the repository ``hcvision/configs`` and ``hcvision/weights`` are links to the top-level ``configs/`` and
``weights/`` (one source); the build copies what they hold into the wheel, and an editable install reads them
through the links. So the same lookups work from a wheel, an editable install and a checkout, in any directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

from .cli import UsageError

__all__ = ["recipes_dir", "weights_dir", "list_recipes", "resolve_recipe"]

_PACKAGE = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    """The packaged recipes: ``cls/*.yaml``, ``dit/*.yaml``, ``dit/flow/*.yaml``."""
    return _PACKAGE / "configs"


def weights_dir() -> Path:
    """Where pretrained tags (``name.hcv_digits``) resolve: ``$HCV_WEIGHTS_DIR`` if set (a folder of your own
    weights with its ``index.json``), else the weights shipped in the package."""
    env = os.environ.get("HCV_WEIGHTS_DIR")
    return Path(env) if env else _PACKAGE / "weights"


def list_recipes(trainer: str = "") -> Dict[str, Path]:
    """Recipe name -> file, for one trainer's folder (``"cls"``, ``"dit"``: ``dit/flow`` included) or all of them:
    ``digits_dhc2`` -> ``.../configs/cls/digits_dhc2.yaml``. Names are unique across the folders (a test checks it)."""
    root = recipes_dir() / trainer if trainer else recipes_dir()
    return {p.stem: p for p in sorted(root.rglob("*.yaml"))} if root.is_dir() else {}


def resolve_recipe(name_or_path: str, trainer: str = "") -> Path:
    """``--config``'s argument: an existing YAML file, or a packaged recipe of ``trainer`` (all trainers if ``""``) by
    its name (``digits_dhc2``) or by its path in the repository (``configs/cls/digits_dhc2.yaml``, as the README
    writes it, from any directory). Anything else is refused: a mistyped path never falls back to a recipe."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes = list_recipes(trainer)
    everywhere = list_recipes()
    relative = {p.relative_to(recipes_dir()).with_suffix("").as_posix(): p for p in everywhere.values()}
    text = name_or_path.removeprefix("configs/")
    text = text[: -len(".yaml")] if text.endswith(".yaml") else text
    found = everywhere.get(text) if "/" not in text and "." not in text else relative.get(text)
    if found is not None and found in recipes.values():
        return found
    if found is not None:
        owner = found.relative_to(recipes_dir()).parts[0]
        raise UsageError(f"--config {name_or_path!r} is a recipe of hcvision.train_{owner}, not of this trainer; "
                         f"accepted: a YAML file, or one of {', '.join(recipes)}")
    raise UsageError(f"--config {name_or_path!r} does not exist as a file and is not a recipe name; accepted: a YAML "
                     f"file, or one of {', '.join(recipes) or '(no recipe packaged)'}")
