"""The README and docs/ say what is true: links resolve inside the repository, every
experiment they show validates, and the README's example is the shipped quickstart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qatbench.spec.schema import validate_experiment

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_resolve_inside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert "../shared" not in text and "/work/" not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{_name(page)} links outside the repository: {target}"
        assert path.exists(), f"{_name(page)}: broken link {target}"


def _experiments() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, block in enumerate(YAML_BLOCK.findall(page.read_text())):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and {"name", "models", "methods"} <= data.keys():
                found.append((f"{_name(page)}#{i}", block))
    return found


@pytest.mark.parametrize(("where", "block"), _experiments(), ids=[w for w, _ in _experiments()])
def test_every_experiment_shown_validates(where: str, block: str) -> None:
    validate_experiment(yaml.safe_load(block), source=where)


def test_the_readme_example_is_the_shipped_quickstart() -> None:
    blocks = YAML_BLOCK.findall((ROOT / "README.md").read_text())
    assert (ROOT / "experiments" / "quickstart.yaml").read_text() in blocks


def test_the_readme_is_read_in_five_minutes() -> None:
    assert len((ROOT / "README.md").read_bytes()) < 15_000
