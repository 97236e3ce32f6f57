"""Entropy neurons: their weight signature, and what mean-ablating them does, directly and through the final LN."""

import streamlit as st

from noln_core import NolnError
from noln_core.findings.neurons import ablation_summary, parse_neurons
from noln_core.viz import findings
from pages.shell import cache, limits
from pages.shell.display import error, figure, md
from pages.shell.runs import current_run, neuron_ablations, run_specs
from pages.shell.state import bound

st.header("Entropy neurons: do they still work without LayerNorm?")
result = current_run()
if result is not None:
    st.markdown(
        "Some last-layer neurons write a large vector into the unembedding's near-null space: they hardly move any "
        "logit directly, but they change the residual stream's norm, so the final LayerNorm's scale, and with it the "
        "entropy of every prediction (Stolfo et al. 2024). Baroni et al. 2025 found that these neurons keep their "
        "signature without LN, but ablating them stops mattering: **the path through the LN scale is gone**."
    )
    specs = run_specs()
    value = bound("neurons", st.text_input, "Neurons of the last layer to ablate",
                  help="'marked': the papers' neurons for GPT-2 small (584, 2123, 2870) and medium (3144, 1083, "
                       "1108), else each model's top three by the papers' ratio ‖w_out‖ / LogitVar. Or numbers, "
                       "such as 584,2123.")
    most = limits.LIMITS.means_max_sequences
    sequences = bound("means_sequences", st.slider, "Sequences of the bundled held-out sample for the means",
                      min(10, most), most, step=10, clamp=lambda v: min(max(int(v), min(10, most)), most),
                      help="Mean ablation puts each neuron's mean activation over a corpus in its place. The papers "
                           "used 250 sequences of 512 tokens of the Pile; offline this is the bundled sample (the "
                           "CLI's --means-data takes any corpus). Computed once per model.")
    try:
        chosen = parse_neurons(value)
        signatures = [cache.neuron_signature(*spec) for spec in specs]
        neurons = tuple(s.marked if chosen is None else chosen for s in signatures)
        ablations = neuron_ablations(neurons, sequences)
    except NolnError as err:
        error(str(err))
    else:
        st.subheader("The weight signature")
        st.markdown(
            "Each dot is a neuron of the last layer: the norm of its output weight against the variance of its "
            "direct effect over the vocabulary (*LogitVar*, as the papers' `svd_comparison.py`). Entropy neurons sit "
            "at the right and the bottom: large, and nearly uniform on every logit."
        )
        figure(findings.signature_scatter(signatures, neurons), "neuron_signature",
               findings.signature_frame(signatures, neurons))
        st.subheader("Mean ablation, split")
        st.markdown(
            "Putting the neurons' mean activation in place of their actual one changes the loss at each position. The "
            "**direct** part reads the changed residual stream with the final LN's scale frozen; the rest goes "
            "**through the final LN's scale**. Without LN that part is exactly zero."
        )
        for col, a in zip(st.columns(len(ablations)), ablations):
            share = ablation_summary(a)[-1].via_ln_share
            col.metric(f"{md(a.name)}: through the final LN", f"{share:.1%}")
            col.caption("Exactly 0: an LN-free model has no scale to change." if a.ln_free else
                        f"Means over {a.means_source}.")
        labels = ablations[0].labels
        row = st.radio("Ablate", range(len(labels)), index=len(labels) - 1, horizontal=True,
                       format_func=lambda r: labels[r], key="w_neuron_row") if len(labels) > 1 else 0
        quantity = st.radio("Show the change of", ("loss", "entropy"), horizontal=True, key="w_neuron_quantity")
        if all(len(a.labels) == len(labels) for a in ablations):
            figure(findings.ablation_parts(ablations, result.tokens, row, quantity), "neuron_ablation",
                   findings.ablation_frame(ablations))
        st.dataframe(findings.ablation_frame(ablations), hide_index=True,
                     height=35 * (sum(len(a.labels) for a in ablations) + 1) + 3)
