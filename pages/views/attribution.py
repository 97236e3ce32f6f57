"""Direct logit attribution, per component, head and source token, against the true direct effect."""

import streamlit as st

from noln_core.analyses import direct_logit_attribution, exactness_tolerance, head_direct_effects
from noln_core.analyses.attribution import VALUE_BIAS
from noln_core.viz import figures, tables
from pages.shell.display import figure, md
from pages.shell.runs import analysis, current_run
from pages.shell.state import bound, source_layer

st.header("Attribution: who wrote the logit difference?")
result = current_run()
if result is not None:
    value_bias = bound("attr_vbias", st.radio, "Each head's value bias b_V is counted in", list(VALUE_BIAS),
                       clamp=lambda v: v if v in VALUE_BIAS else "head", horizontal=True,
                       format_func=lambda v: {"head": "the head (this app)",
                                              "b_O": "the layer's b_O (TransformerLens, the papers)"}[v],
                       help="Since a head's attention sums to 1, its output always holds b_V W_O. TransformerLens "
                            "folds it into b_O by default, so the papers' per-head numbers leave it out. Only the split "
                            "between heads and the bias term changes; the components and their sum do not.")
    dlas = analysis(direct_logit_attribution, value_bias=value_bias)
    if dlas is None:
        st.info("Pick an answer and a counterfactual token in the sidebar.")
    else:
        effects = analysis(head_direct_effects, value_bias=value_bias)
        st.markdown(
            "Direct logit attribution splits the logit difference into what each component wrote into the residual "
            "stream, read through the unembedding. With LayerNorm the final LN's scale must be frozen at its cached "
            "value, and a component's DLA is not its true effect; **without LayerNorm the split is exact**."
        )
        st.subheader("Exactness")
        labels = tables.model_labels(d.name for d in dlas)
        for col, label, d, e in zip(st.columns(len(dlas)), labels, dlas, effects):
            total = d.values.sum() + d.constant
            col.metric(f"{md(label)}: components + constant", f"{total:+.5f}")
            within = "within" if d.error <= exactness_tolerance(d.logit_diff) else "outside"
            col.caption(f"Σ components {d.values.sum():+.5f} + constant {d.constant:+.5f} vs logit difference "
                        f"{d.logit_diff:+.5f}: error {d.error:.1e} ({within} float32 tolerance). Method: {d.method}. "
                        f"DLA vs direct effect over heads: NMAE {e.nmae:.2%}; {VALUE_BIAS[d.value_bias]}.")
        figure(figures.dla_components_chart(dlas), "dla_components", tables.dla_frame(dlas))
        heads = tables.heads_frame(dlas, effects)
        figure(figures.head_heatmaps(dlas), "dla_heads", heads)
        n_layers = dlas[0].heads.shape[0]
        layer = bound("attr_layer", st.slider, "Layer for the source-token view", 0, n_layers - 1,
                      clamp=lambda v: source_layer(v, n_layers))
        figure(figures.head_source_heatmaps(dlas, layer, result.tokens), "dla_head_source",
               tables.head_source_frame(dlas, layer, result.tokens))
        st.markdown(
            "Each head's DLA against its **direct effect**: the true change in the logit difference when only that "
            "head's direct path is removed and the final LN recomputed. The follow-up paper reports an NMAE of "
            "49.07% for GPT-2 small and exactly 0% for its LN-free fine-tune."
        )
        figure(figures.dla_vs_direct_effect(effects), "dla_vs_direct_effect", heads)
        st.subheader("Top MLP neurons")
        neurons = tables.neurons_frame(dlas, 10)
        st.dataframe(neurons, hide_index=True, height=35 * (len(neurons) + 1) + 3)  # every model's rows, no inner scroll
