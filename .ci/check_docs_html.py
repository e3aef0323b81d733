"""Fail when the built docs show raw markup instead of rendering it.

Usage: python .ci/check_docs_html.py SITE_DIR

Scans every page of a built MkDocs site (``mkdocs build --site-dir SITE_DIR``) for markup that
reached the reader unrendered: Sphinx roles (``:class:``, ``:func:``, ...), ``.. math::``
blocks, double backticks, LaTeX commands such as ``\\gamma`` outside the maths that KaTeX
renders, emphasis (``<em>``) inside a formula or inside a word (Markdown eating underscores),
and attributes that are not HTML's (the ``attr_list`` extension reading text in braces, such as
a formula's ``_{b ∈ c}``, as attributes, so the text disappears from the page). Code blocks are
exempt: they show source as it is. Exit status 1 lists every finding.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|math|ref):`?")
LATEX_COMMAND = re.compile(r"\\[a-zA-Z]{2,}")
CHECKS = (
    (ROLE, "a reStructuredText role"),
    (re.compile(r"\.\. math::"), "a reStructuredText math block"),
    (re.compile(r"``"), "double backticks"),
    (LATEX_COMMAND, "a LaTeX command outside rendered maths"),
)
#: Attribute names the site's pages use; any other one is text that `attr_list` took for
#: attributes (`{0: ...}` or `_{b ∈ c}` in a table cell or a paragraph).
HTML_ATTRIBUTES = frozenset(
    {
        "accept", "action", "align", "alt", "async", "autocapitalize", "autocomplete",
        "autocorrect", "autofocus", "charset", "checked", "cite", "class", "clip-rule", "colspan",
        "content", "controls", "crossorigin", "d", "datetime", "decoding", "defer", "dir",
        "disabled", "download", "fill", "fill-rule", "for", "height", "hidden", "href",
        "hreflang", "http-equiv", "id", "integrity", "label", "lang", "loading", "media",
        "method", "name", "novalidate", "open", "placeholder", "property", "readonly", "rel",
        "required", "reversed", "role", "rowspan", "scope", "selected", "sizes", "span",
        "spellcheck", "src", "srcset", "start", "stroke", "stroke-linecap", "stroke-linejoin",
        "stroke-width", "style", "tabindex", "target", "title", "translate", "type", "value",
        "viewbox", "width", "xmlns", "xmlns:xlink", "xlink:href",
    }
)
#: Elements whose text is shown as it is written.
VERBATIM = {"code", "pre", "script", "style", "kbd", "samp"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, is maths)
        self.findings: list[str] = []
        self.previous = ""  # the text just before the current tag

    def _in(self, predicate: str) -> bool:
        if predicate == "maths":
            return any(maths for _, maths in self.stack)
        return any(tag in VERBATIM for tag, _ in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "em" and self._in("maths"):
            self.findings.append("<em> inside a formula (underscores read as emphasis)")
        elif tag == "em" and not self._in("verbatim") and self.previous[-1:].isalnum():
            self.findings.append(
                f"<em> inside a word (an underscore read as emphasis): ...{self.previous[-30:]}"
            )
        unknown = [
            name
            for name, _ in attrs
            if name not in HTML_ATTRIBUTES and not name.startswith(("data-", "aria-"))
        ]
        if unknown:
            self.findings.append(
                f"<{tag}> has attributes {unknown} that are not HTML's: text in braces read as "
                f"attributes (attr_list), lost from the page after ...{self.previous[-30:]}"
            )
        if tag not in VOID:
            self.stack.append((tag, "arithmatex" in classes or "katex" in classes))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        self.previous = (self.previous + data)[-60:]
        if self._in("verbatim"):
            return
        for pattern, what in CHECKS:
            if pattern is LATEX_COMMAND and self._in("maths"):
                continue
            match = pattern.search(data)
            if match:
                start = max(match.start() - 30, 0)
                excerpt = " ".join(data[start : match.end() + 30].split())
                self.findings.append(f"{what}: ...{excerpt}...")


def scan(site: Path) -> dict[Path, list[str]]:
    """Findings per page of the built site (pages without findings are left out)."""
    pages = sorted(path for path in site.rglob("*.html") if "assets" not in path.parts)
    if not pages:
        raise SystemExit(f"{site} holds no HTML pages: build the site first.")
    results = {}
    for page in pages:
        scanner = _Scanner()
        scanner.feed(page.read_text(encoding="utf-8"))
        if scanner.findings:
            results[page.relative_to(site)] = scanner.findings
    return results


def main(argv: list[str]) -> int:
    """Scan ``argv[0]``; print the findings; 1 if there are any."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    results = scan(Path(argv[0]))
    for page, findings in results.items():
        for finding in findings:
            print(f"{page}: {finding}")
    total = sum(map(len, results.values()))
    print(f"check_docs_html: {total} raw-markup finding(s)", file=sys.stderr)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
