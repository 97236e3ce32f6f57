"""Logit difference and its logit lens."""

import streamlit as st

from noln_core.analyses import logit_difference
from noln_core.viz import figures, tables
from pages.shell.display import figure, md
from pages.shell.runs import analysis, current_run

st.header("Logit difference and its logit lens")
result = current_run()
if result is not None:
    lens = analysis(logit_difference)
    if lens is None:
        st.info("Pick an answer and a counterfactual token in the sidebar.")
    else:
        cols = st.columns(len(lens.models))
        for col, m in zip(cols, lens.models):
            col.metric(f"{md(m.name)} ({'LN-free' if m.ln_free else 'with LN'})", f"{m.value:+.4f}")
        st.markdown(
            f"The logit difference logit\\[{md(repr(lens.answer))}\\] − logit\\[{md(repr(lens.counterfactual))}\\] "
            f"at position {lens.position}, and the same quantity read off the residual stream after every sublayer. "
            "Models with LayerNorm recompute the final LN on each intermediate residual; LN-free models read it "
            "linearly, so for them each step of the lens is exactly the sum of what came before."
        )
        figure(figures.logit_lens_chart(lens), "logit_lens", tables.logit_lens_frame(lens))
