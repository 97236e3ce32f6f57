"""Showing things: user text made inert for Markdown, figures with their PNG and CSV downloads."""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from pages.shell.state import state

PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}
_MARKDOWN_ACTIVE = set("\\`*_[]<>$~|:&#")
WORD_JOINER = "\u2060"
_AUTOLINK = re.compile(r"(?i)(?<=w)(?=ww)|(?=://)|(?=@)")
"""Where GitHub-flavoured autolinks start: ``www``, ``://`` and ``@``.  Streamlit's Markdown finds them in the text
after escapes are resolved, so escaping cannot stop them; an invisible word joiner there does."""


def md(text: str) -> str:
    """User text made literal and inert for Streamlit's Markdown: no emphasis, links of any kind (``www.x.org``,
    ``https://…`` and e-mail addresses too), HTML, LaTeX, emoji or colour codes.  It reads as typed."""
    joined = _AUTOLINK.sub(WORD_JOINER, str(text))
    return "".join("\\" + ch if ch in _MARKDOWN_ACTIVE else (" " if ch in "\r\n" else ch) for ch in joined)


_PAGE_WORDS = (
    ("raise --max-tokens to at least", "raise the budget to at least"), ("lower --seq-len", "lower the tokens per sequence"),
    ("choose one with --field", "name it in the field box"), ("--seq-len", "tokens per sequence"),
    ("--max-tokens", "budget"), ("--batch", "batch"), ("--field", "field"),
)
_SERVER_PATH = re.compile(r"'(/[^']*/)([^'/]*)'")
_HOSTED_ADVICE = (  # advice for someone at the server's own prompt, which a visitor is not
    (re.compile(r"pre-download it where there is a network .*$"), "this server cannot fetch it now: try again later"),
    (re.compile(r",? or point at a local directory holding config\.json and the weights"), ""),
    (re.compile(r"\(?`(huggingface-cli|hf|pip|python|accelerate) [^`]*`\)?"), ""),
    (re.compile(r"\(~/\.cache/[^)]*\)|~/\.cache/\S*"), ""),
)


def for_page(message: str, hosted: bool = False) -> str:
    """A core error in the page's own words: its fields, not the command line's flags; hosted, no server path and
    no advice meant for the server's own prompt."""
    for cli, page in _PAGE_WORDS:
        message = message.replace(cli, page)
    if hosted:
        message = _SERVER_PATH.sub(lambda m: repr(m.group(2) or "a server folder"), message)
        for pattern, replacement in _HOSTED_ADVICE:
            message = pattern.sub(replacement, message)
        message = re.sub(r"\s{2,}", " ", message).strip()
    return message


def error(message: str, icon: str = ":material/error:", prefix: str = "") -> None:
    """An error box for a core message: in the page's words (:func:`for_page`), user text inert."""
    from pages.shell import limits

    st.error(prefix + md(for_page(str(message), limits.LIMITS.hosted)), icon=icon)


PRESENTATION_FONT = 22
"""Figure font size in presentation mode (Plotly's default is 12)."""
PRESENTATION_SCALE = 1.5
"""Figure height multiplier in presentation mode."""
_PRESENTATION_CSS = """<style>
[data-testid="stMain"] { font-size: 1.35rem; }
[data-testid="stMain"] h1 { font-size: 3rem; }
[data-testid="stMain"] h2, [data-testid="stMain"] h3 { font-size: 2.2rem; }
[data-testid="stMetricValue"] { font-size: 2.8rem; }
</style>"""


def presentation_style() -> None:
    """Larger text for lectures (a fixed style sheet; no user text goes into HTML)."""
    if state().present:
        st.html(_PRESENTATION_CSS)


def presented(fig):
    """``fig`` with larger fonts and height when presentation mode is on (a copy; the builder stays pure)."""
    if not state().present:
        return fig
    import plotly.graph_objects as go

    fig = go.Figure(fig)
    fig.update_layout(font={"size": PRESENTATION_FONT},
                      height=int((fig.layout.height or 450) * PRESENTATION_SCALE))
    return fig


def figure(fig, name: str, frame: pd.DataFrame | None = None) -> None:
    """Show a Plotly figure (its toolbar saves a PNG) and offer its data as CSV."""
    fig = presented(fig)
    config = {**PLOT_CONFIG, "toImageButtonOptions": {**PLOT_CONFIG["toImageButtonOptions"], "filename": name}}
    st.plotly_chart(fig, config=config, key=f"fig_{name}")
    if frame is not None:
        csv(frame, name)


def csv(frame: pd.DataFrame, name: str) -> None:
    """A CSV download of ``frame``."""
    st.download_button(f"CSV: {name}", frame.to_csv(index=False).encode(), file_name=f"{name}.csv", mime="text/csv",
                       key=f"csv_{name}")
