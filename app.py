"""noLN Explorer: GPT-2 beside its LayerNorm-free fine-tunes.  Run with ``streamlit run app.py``."""

from __future__ import annotations

import streamlit as st

from pages import _common as app

st.set_page_config(page_title="noLN Explorer", page_icon=":material/functions:", layout="wide")
app.init_state()

PAGES = {
    "overview": st.Page("pages/overview.py", title="Overview", icon=":material/insights:", url_path="overview", default=True),
    "logit-difference": st.Page("pages/logit_difference.py", title="Logit difference", icon=":material/balance:", url_path="logit-difference"),
    "residual-norms": st.Page("pages/residual_norms.py", title="Residual norms", icon=":material/straighten:", url_path="residual-norms"),
    "attribution": st.Page("pages/attribution.py", title="Attribution", icon=":material/extension:", url_path="attribution"),
    "attention": st.Page("pages/attention.py", title="Attention", icon=":material/visibility:", url_path="attention"),
    "about": st.Page("pages/about.py", title="About", icon=":material/menu_book:", url_path="about"),
}

page = st.navigation(list(PAGES.values()))
wanted = app.linked_page()
if wanted in PAGES and PAGES[wanted].url_path != page.url_path:
    st.switch_page(PAGES[wanted])

st.sidebar.title("noLN Explorer")
app.prepare()
app.entered_through_app()
page.run()
