"""noLN Explorer: GPT-2 beside its LayerNorm-free fine-tunes.  Run with ``streamlit run app.py``."""

from __future__ import annotations

import streamlit as st

from pages import PAGES
from pages.shell import display, export, runs, state, tour

presenting = st.query_params.get("present") == "1"  # a lecture link opens with the sidebar out of the way
st.set_page_config(page_title="noLN Explorer", page_icon=":material/functions:", layout="wide",
                   initial_sidebar_state="collapsed" if presenting else "auto")
state.init_state()
tour.remember_link()
state.apply_pending()
display.presentation_style()

pages = {spec.name: st.Page(spec.script, title=spec.title, icon=spec.icon, url_path=spec.name, default=i == 0)
         for i, spec in enumerate(PAGES)}
page = st.navigation(list(pages.values()))
wanted = state.linked_page()
if wanted in pages and pages[wanted] is not page:
    st.switch_page(pages[wanted])
state.set_state(page=next(name for name, p in pages.items() if p is page))

st.sidebar.title("noLN Explorer")
result = runs.prepare()
state.sync_url()
export.share_footer(result)
page.run()
