"""The code in docs/regularizers/*.md runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).resolve().parents[1] / "docs" / "regularizers").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_code_blocks_run(page: Path) -> None:
    for block in BLOCK.findall(page.read_text()):
        exec(compile(block, str(page), "exec"), {})


def test_every_page_names_its_source_and_formula() -> None:
    assert len(PAGES) >= 7
    for page in PAGES:
        if page.name in ("index.md", "results.md"):
            continue
        text = page.read_text()
        assert "$$" in text, page.name
        assert re.search(r"`(trainers|prompting|Dassl)[^`]*\.py`", text), page.name
