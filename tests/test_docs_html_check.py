"""`.ci/check_docs_html.py` notices markup that reached the reader unrendered."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "check_docs_html.py"


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_docs_html", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def findings(checker, html: str) -> list[str]:
    scanner = checker._Scanner()
    scanner.feed(html)
    return scanner.findings


@pytest.mark.parametrize(
    ("html", "what"),
    [
        # docs/maths.md before 1.0: "γ̄_c = (1/n_c) Σ_{b ∈ c} γ_b" in a paragraph.
        ("<p>γ̄<em _ b c>c = (1/n_c) Σ</em> γ_b is the mean</p>", "not HTML's"),
        # docs/reliability.md before 1.0: "{0: ['mean |cos| ...']}" at the end of a table cell.
        ("<td 0.9_ 0: 1.000 _ _124_cos_124_ _mean>collapsed=True:</td>", "not HTML's"),
        ("<p>the mean n<em>c</em> of class c</p>", "inside a word"),
        ('<p><span class="arithmatex">x<em>b</em></span></p>', "inside a formula"),
        ("<p>see :class:`Foo`</p>", "reStructuredText role"),
        ("<p>a \\gamma here</p>", "LaTeX command"),
    ],
)
def test_broken_markup_is_found(checker, html, what) -> None:
    assert any(what in finding for finding in findings(checker, html)), findings(checker, html)


@pytest.mark.parametrize(
    "html",
    [
        '<p>A <a href="x.html" title="t">link</a>, <em>emphasis</em> and <code>x_{b}</code>.</p>',
        '<svg viewBox="0 0 1 1" xmlns="http://www.w3.org/2000/svg"><path d="M0"/></svg>',
        '<div class="arithmatex">\\(\\gamma_{b}\\)</div>',
        '<td data-sort="1" aria-label="x">cell</td>',
    ],
)
def test_rendered_markup_passes(checker, html) -> None:
    assert findings(checker, html) == []
