"""MkDocs hook: geolie's docstrings use Sphinx roles (``:func:`x```, ``:class:``, ``:math:``...) as e3nn's do;
mkdocstrings renders the role's target as code and leaves the role name in front of it. This drops the role names
from the rendered pages (the code they name stays)."""
import re

_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|math|obj|exc):(?=<code)")


def on_page_content(html, page, config, files):  # noqa: D103 - MkDocs hook
    return _ROLE.sub("", html)
