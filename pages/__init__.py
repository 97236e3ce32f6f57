"""The app's pages: the one list of them, as data (no Streamlit here).

Each page is a thin script in ``pages/views/`` run by ``st.navigation`` from
``app.py``; the shell it uses (state, caching, sidebar, exports) is in
``pages/shell/``.  Page scripts live one folder down on purpose: Streamlit runs
any ``pages/*.py`` beside the main script on its own (its pre-``st.navigation``
mode) for a fresh server's first request and in ``AppTest``, bypassing
``app.py``.  With nothing but this ``__init__.py`` at the top of ``pages/``,
that mode finds no page of its own, falls back to ``app.py``, and
``app.py``'s ``st.navigation`` then opens the page the URL names.

Adding a page: write ``pages/views/NAME.py``, add one :class:`PageSpec` below,
and its tests.  Links, navigation and the tests that visit every page read
this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VIEWS = Path(__file__).resolve().parent / "views"


@dataclass(frozen=True)
class PageSpec:
    name: str
    """URL path and the ``page`` value of a link."""
    title: str
    icon: str
    """A Material icon (``:material/NAME:``)."""

    @property
    def script(self) -> str:
        """The page script, relative to the repository root (as ``st.Page`` and ``AppTest.switch_page`` take it)."""
        return f"pages/views/{self.name.replace('-', '_')}.py"


PAGES: tuple[PageSpec, ...] = (
    PageSpec("overview", "Overview", ":material/insights:"),
    PageSpec("tour", "Tour", ":material/school:"),
    PageSpec("logit-difference", "Logit difference", ":material/balance:"),
    PageSpec("residual-norms", "Residual norms", ":material/straighten:"),
    PageSpec("attribution", "Attribution", ":material/extension:"),
    PageSpec("attention", "Attention", ":material/visibility:"),
    PageSpec("study", "Study", ":material/query_stats:"),
    PageSpec("about", "About", ":material/menu_book:"),
)
"""Every page, the first being the default."""

PAGE_NAMES: tuple[str, ...] = tuple(p.name for p in PAGES)
