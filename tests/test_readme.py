"""The README's zoo tables are generated from the registry; this keeps them current."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import hcvision  # noqa: F401
from hcvision.models.zoo import BEGIN, END, zoo_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(text: str, family: str) -> str:
    begin, end = BEGIN.format(family=family), END.format(family=family)
    match = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), text, re.S)
    assert match, f"README lacks the {family} zoo markers"
    return match.group(1).strip()


@pytest.mark.slow
def test_readme_vit_zoo_table_is_current():
    assert _section(README.read_text(), "vit") == zoo_markdown("vit_")


def test_readme_quickstart_shows_make_demo_and_make_test_first():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1]
    first_block = quick.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]


@pytest.mark.slow
def test_readme_dit_zoo_table_is_current():
    assert _section(README.read_text(), "dit") == zoo_markdown("dit_")


def test_readme_kinds_table_is_current():
    """The connection API's kinds table: one row per registered kind, counts built on the meta device."""
    from hcvision.models.zoo import kinds_markdown

    assert _section(README.read_text(), "kinds") == kinds_markdown()


def test_readme_diffusers_snippet_runs_as_printed():
    """The README's diffusers example, executed as it stands (a random digits DiT: sampling, not quality)."""
    text = README.read_text()
    section = text.split("**diffusers.**", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (diffusers)", "exec"), namespace)  # noqa: S102
    images = namespace["images"]
    assert len(images) == 3 and images[0].size == (8, 8)
