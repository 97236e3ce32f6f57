"""Direct logit attribution, per component, head and source token, against the true direct effect."""

import streamlit as st

from noln_core import figures, tables
from noln_core.attribution import exactness_tolerance
from pages import _common as app

app.page("attribution")
st.header("Attribution: who wrote the logit difference?")
result = app.current_run()
if result is not None:
    dlas = app.analysis("dla")
    if dlas is None:
        st.info("Pick an answer and a counterfactual token in the sidebar.")
    else:
        effects = app.analysis("direct_effect")
        st.markdown(
            "Direct logit attribution splits the logit difference into what each component wrote into the residual "
            "stream, read through the unembedding. With LayerNorm the final LN's scale must be frozen at its cached "
            "value, and a component's DLA is not its true effect; **without LayerNorm the split is exact**."
        )
        st.subheader("Exactness")
        cols = st.columns(len(dlas))
        for col, d, e in zip(cols, dlas, effects):
            total = d.values.sum() + d.constant
            ok = d.error <= exactness_tolerance(d.logit_diff)
            col.metric(f"{app.md(d.name)}: components + constant", f"{total:+.5f}")
            col.caption(f"Σ components {d.values.sum():+.5f} + constant {d.constant:+.5f} vs logit difference "
                        f"{d.logit_diff:+.5f}: error {d.error:.1e}. "
                        f"{'Exact (no normalisation)' if d.exact and ok else 'Cached final-LN scale'}; "
                        f"DLA vs direct effect over heads: NMAE {e.nmae:.2%}.")
        app.figure(figures.dla_components_chart(dlas), "dla_components", tables.dla_frame(dlas))
        heads = tables.heads_frame(dlas, effects)
        app.figure(figures.head_heatmaps(dlas), "dla_heads", heads)
        n_layers = dlas[0].heads.shape[0]
        layer = st.slider("Layer for the source-token view", 0, n_layers - 1, n_layers - 1, key="attr_layer")
        app.figure(figures.head_source_heatmaps(dlas, layer, result.tokens), "dla_head_source",
                   tables.head_source_frame(dlas, layer, result.tokens))
        st.markdown(
            "Each head's DLA against its **direct effect**: the true change in the logit difference when only that "
            "head's direct path is removed and the final LN recomputed. The follow-up paper reports an NMAE of "
            "49.07% for GPT-2 small and exactly 0% for its LN-free fine-tune."
        )
        app.figure(figures.dla_vs_direct_effect(effects), "dla_vs_direct_effect", heads)
        st.subheader("Top MLP neurons")
        st.dataframe(tables.neurons_frame(dlas, 10), hide_index=True)
