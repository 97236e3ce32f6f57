"""Logit difference and its logit lens."""

import streamlit as st

from noln_core import figures, tables
from pages import _common as app

app.page("logit-difference")
st.header("Logit difference and its logit lens")
result = app.current_run()
if result is not None:
    analysis = app.analysis("logit_diff")
    if analysis is None:
        st.info("Pick an answer and a counterfactual token in the sidebar.")
    else:
        cols = st.columns(len(analysis.models))
        for col, m in zip(cols, analysis.models):
            col.metric(f"{app.md(m.name)} ({'LN-free' if m.ln_free else 'with LN'})", f"{m.value:+.4f}")
        st.markdown(
            f"The logit difference logit\\[{app.md(repr(analysis.answer))}\\] − logit\\[{app.md(repr(analysis.counterfactual))}\\] at position "
            f"{analysis.position}, and the same quantity read off the residual stream after every sublayer. "
            "Models with LayerNorm recompute the final LN on each intermediate residual; LN-free models read it "
            "linearly, so for them each step of the lens is exactly the sum of what came before."
        )
        app.figure(figures.logit_lens_chart(analysis), "logit_lens", tables.logit_lens_frame(analysis))
