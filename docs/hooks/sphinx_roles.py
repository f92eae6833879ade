"""MkDocs hook: rowsync's docstrings use Sphinx roles (``:class:`~sqlalchemy.Engine```);
mkdocstrings leaves them as text. Render each as the code it names (``~`` keeps the last
component, as Sphinx does)."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data):<code>(~?)([\w.]+)</code>")


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)
