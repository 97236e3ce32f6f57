"""The sidebar's footer: the link that reopens exactly this view, and the run manifest."""

from __future__ import annotations

import json
import platform
from typing import Any

import streamlit as st
import torch

import noln_core
from noln_core import RunResult
from noln_core.findings.patching import swapped_prompt
from noln_core.notebook import VIEWS, View, install_source, notebook_json, view_script
from pages.shell import limits
from pages.shell.links import AppState, share_link
from pages.shell.state import source_layer, state
from pages.shell.tour import current_figure


def share_url() -> str:
    try:
        url = st.context.url or ""
        base = url.split("?", 1)[0].rsplit("/", 1)[0] if url.count("/") > 2 else url
    except Exception:  # older Streamlit, or AppTest: a relative link still works
        base = ""
    return share_link(state(), base)


def manifest(result: RunResult, link: str = "") -> dict[str, Any]:
    """The run manifest: versions, models (sources, revisions, commits), dtype, device, token ids."""
    return {
        "app": "noLN Explorer", "noln_core_version": noln_core.__version__, "streamlit_version": st.__version__,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "models": [{"name": r.info.name, "source": r.info.source, "revision": r.info.revision, "commit": r.info.commit,
                    "ln_free": r.info.ln_free, "dtype": r.info.dtype, "device": r.info.device} for r in result.runs],
        "text": result.text, "token_ids": [int(i) for i in result.token_ids], "prepend_bos": result.prepend_bos,
        "position": result.position,
        "answer": result.target.answer if result.target else None,
        "counterfactual": result.target.counterfactual if result.target else None,
        "link": link,
    }


def share_footer(result: RunResult | None) -> None:
    """Sidebar footer: the link that reproduces this view, and the run manifest."""
    with st.sidebar:
        st.subheader("Share")
        st.caption("Copy this link (button at its right) to reopen exactly this view.")
        link = share_url()
        st.code(link, language=None, wrap_lines=True)
        if result is not None:
            st.download_button("Run manifest (JSON)", json.dumps(manifest(result, link), indent=2),
                               file_name="noln-run-manifest.json", mime="application/json", key="manifest")
            open_in_python(result)


TOUR_VIEWS = {"predictions": "overview", "parting": "overview", "first-token-norm": "residual-norms",
              "dla": "attribution", "dla-vs-direct-effect": "attribution", "attention-sinks": "attention"}
"""The analysis page whose notebook reproduces a tour step's figure."""


def current_view(result: RunResult, s: AppState, tour_figure: str | None = None) -> View | None:
    """The view on screen as a :class:`noln_core.notebook.View` (None on pages without a notebook).

    On the Tour page, ``tour_figure`` (the step's figure) picks the analysis page that reproduces it.
    """
    page = TOUR_VIEWS.get(tour_figure or "", "overview") if s.page == "tour" else s.page
    if page not in VIEWS:
        return None
    if page in ("attribution", "patching") and not (s.answer and s.counterfactual):
        page = "overview"
    return View(models=tuple(m for m in (s.model_a, s.model_b, s.model_c) if m), text=s.text,
                answer=s.answer or None, counterfactual=s.counterfactual or None, position=result.position,
                bos=s.bos, page=page, device="cpu", dtype=s.dtype, install=install_source(limits.LIMITS.hosted),
                options={"layer": source_layer(s.attr_layer, result.runs[0].info.n_layers), "value_bias": s.attr_vbias,
                         "neurons": s.neurons, "means_sequences": min(s.means_sequences,
                                                                      limits.LIMITS.means_max_sequences),
                         "corrupted": s.corrupted if s.corrupted is not None else swapped_prompt(
                             s.text, s.answer or "", s.counterfactual or "")})


def open_in_python(result: RunResult) -> None:
    """Two downloads: this view as a Jupyter notebook and as a script, reproducing it with noln_core."""
    view = current_view(result, state(), current_figure() if state().page == "tour" else None)
    if view is None:
        return
    st.subheader("Open this view in Python")
    try:
        notebook, script = notebook_json(view), view_script(view)
    except ValueError as err:  # e.g. the attribution view without an answer
        st.caption(str(err))
        return
    st.caption("A notebook that loads the same models, runs the same text and draws this page's figures.")
    c1, c2 = st.columns(2)
    c1.download_button("Notebook", notebook, file_name=f"noln-{view.page}.ipynb", mime="application/x-ipynb+json",
                       key="notebook_ipynb")
    c2.download_button("Script", script, file_name=f"noln-{view.page}.py", mime="text/x-python", key="notebook_py")
