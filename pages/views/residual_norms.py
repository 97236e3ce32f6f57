"""Residual-stream norms and LayerNorm scales."""

import streamlit as st

from noln_core.analyses import residual_norms
from noln_core.viz import figures, tables
from pages.shell.display import figure, md
from pages.shell.runs import analysis, current_run
from pages.shell.state import bound

st.header("Residual-stream norms")
result = current_run()
if result is not None:
    norms = analysis(residual_norms)
    include_first = bound("norms_first", st.toggle, "Include the first token",
                          help="The first token's norm dwarfs the others in models with LN.")
    if result.n_tokens < 2:
        include_first = True
    st.markdown(
        "The L2 norm of the residual stream entering each layer, per position, on one log colour scale for every "
        "model. With LayerNorm, GPT-2 lets the first token's norm grow to about 3,000 and divides it away; an "
        "LN-free model cannot divide, and keeps it near 300–500 (Baroni et al. 2025)."
    )
    labels = tables.model_labels(m.name for m in norms)
    for col, label, m in zip(st.columns(len(norms)), labels, norms):
        col.metric(f"Max first-token norm · {md(label)}", f"{m.first_token_max:,.1f}")
    frame = tables.norms_frame(norms, result.tokens)
    figure(figures.norm_heatmaps(norms, result.tokens, include_first), "residual_norms", frame)
    if len(norms) >= 2:
        figure(figures.norm_ratio_heatmap(norms, result.tokens, include_first), "residual_norm_ratio", frame)
    for index, (label, m) in enumerate(zip(labels, norms)):
        if m.ln_free:
            st.caption(f"{md(label)} is LN-free: nothing in it divides the residual stream, so it has no scales to show.")
        else:
            figure(figures.ln_scale_heatmap(m, result.tokens, include_first), f"ln_scales_{index}", frame)
