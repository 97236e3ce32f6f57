"""The app's pages: the one list of them, as data (no Streamlit here).

Each page is a thin script in ``pages/views/`` run by ``st.navigation`` from
``app.py``; the shell it uses (state, caching, sidebar, exports) is in
``pages/shell/``.

The ``pages/NAME.py`` files beside this one are first-request shims, one per
page but the default, each only running ``app.py``.  A fresh server serves its
first request in Streamlit's old multipage mode, because a ``pages/`` folder
exists: the pages it knows are the ``pages/*.py`` files.  Without a file for
the page a link names (``/attribution?...``), that mode tells the browser
"Page not found" before ``app.py``'s ``st.navigation`` opens the right page
underneath.  With the shim it finds the page, runs ``app.py`` through it, and
``st.navigation`` opens the page the URL names; from then on the process uses
``st.navigation`` alone.  The real page scripts live one folder down so that
this mode never runs one of them without ``app.py``.

Adding a page: write ``pages/views/NAME.py``, copy a shim to ``pages/NAME.py``,
add one :class:`PageSpec` below, and its tests.  Links, navigation and the tests that visit every page read
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
    PageSpec("neurons", "Entropy neurons", ":material/tune:"),
    PageSpec("patching", "Patching", ":material/healing:"),
    PageSpec("study", "Study", ":material/query_stats:"),
    PageSpec("about", "About", ":material/menu_book:"),
)
"""Every page, the first being the default."""

PAGE_NAMES: tuple[str, ...] = tuple(p.name for p in PAGES)
