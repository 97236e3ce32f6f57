"""Residual-stream norms and LayerNorm scales."""

import streamlit as st

from noln_core import figures, tables
from pages import _common as app

app.page("residual-norms")
st.header("Residual-stream norms")
result = app.current_run()
if result is not None:
    norms = app.analysis("norms")
    include_bos = st.toggle("Include the first token", value=True, key="norms_bos",
                            help="The first token's norm dwarfs the others in models with LN.")
    if result.n_tokens < 2 and not include_bos:
        include_bos = True
    st.markdown(
        "The L2 norm of the residual stream entering each layer, per position, on one log colour scale for every "
        "model. With LayerNorm, GPT-2 lets the first token's norm grow to about 3,000 and divides it away; an "
        "LN-free model cannot divide, and keeps it near 300–500 (Baroni et al. 2025)."
    )
    cols = st.columns(len(norms))
    for col, m in zip(cols, norms):
        col.metric(f"Max first-token norm · {app.md(m.name)}", f"{m.first_token_max:,.1f}")
    frame = tables.norms_frame(norms, result.tokens)
    app.figure(figures.norm_heatmaps(norms, result.tokens, include_bos), "residual_norms", frame)
    if len(norms) >= 2:
        app.figure(figures.norm_ratio_heatmap(norms, result.tokens, include_bos), "residual_norm_ratio", frame)
    for m in norms:
        if m.ln_free:
            st.caption(f"{app.md(m.name)} is LN-free: nothing in it divides the residual stream, so it has no scales to show.")
        else:
            app.figure(figures.ln_scale_heatmap(m, result.tokens, include_bos), f"ln_scales_{norms.index(m)}", frame)
