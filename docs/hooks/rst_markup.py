"""MkDocs hook: render the reStructuredText markup of promptmix's docstrings readably.

The docstrings are Google style but use Sphinx roles (``:class:`X```, ``:math:`x```) and
``.. math::`` blocks, which mkdocstrings' Google parser leaves as literal text. This hook turns a
role into plain inline code (``~a.b.C`` shows as ``C``, as in Sphinx) and a math block into a
code block of its LaTeX source, so the API reference reads cleanly without a math renderer.
"""

from __future__ import annotations

import html
import re
import textwrap
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|math):<code>(~?)([^<]*)</code>")
MATH_BLOCK = re.compile(r"<p>\.\. math::\n(.*?)</p>", re.DOTALL)


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def _math_block(match: re.Match[str]) -> str:
    latex = textwrap.dedent(match.group(1)).strip("\n")
    return f'<pre class="math"><code>{html.escape(html.unescape(latex))}</code></pre>'


def on_page_content(content: str, **kwargs: Any) -> str:
    return ROLE.sub(_role, MATH_BLOCK.sub(_math_block, content))
