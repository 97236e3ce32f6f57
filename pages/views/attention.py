"""Attention patterns and attention sinks."""

import streamlit as st

from noln_core.analyses import attention
from noln_core.viz import figures, tables
from pages.shell.display import figure, md
from pages.shell.runs import analysis, current_run, head_patterns
from pages.shell.state import bound

st.header("Attention and attention sinks")
result = current_run()
if result is not None:
    summaries = analysis(attention)
    st.markdown(
        "Two definitions of the *sink rate*, each as its authors' code computes it. **Gu et al. 2024** "
        "(`compute_attention_sink`): the share of heads whose attention on the first token, averaged over every "
        "position (the first one, which can only attend to itself, included), is above 30% (the heatmap). "
        "**Baroni et al. 2025's code** (`calculate_sink_rate`): the share of (layer, head, query) triples, the first "
        "query included, whose attention on the first token is above 0.3; their GPT-2 medium figure, 55.3% for the "
        "fine-tune with LayerNorm against 45.3% without, uses it over a corpus. Sinks let a head do nothing. For corpus-level rates with "
        "intervals, see the Study page."
    )
    labels = tables.model_labels(s.name for s in summaries)
    for col, label, s in zip(st.columns(len(summaries)), labels, summaries):
        col.metric(f"Sink rate (Gu et al.) · {md(label)}", f"{s.sink_rate:.1%}" if s.sink_rate == s.sink_rate else "—")
        col.metric(f"Sink rate (Baroni et al. code) · {md(label)}", f"{s.sink_rate_papers:.1%}")
    figure(figures.sink_heatmaps(summaries), "attention_sinks", tables.attention_frame(summaries))
    L, H = summaries[0].to_first.shape
    c1, c2 = st.columns(2)
    layer = bound("attn_layer", c1.number_input, "Layer", 0, L - 1, clamp=lambda v: min(max(v, 0), L - 1))
    head = bound("attn_head", c2.number_input, "Head", 0, H - 1, clamp=lambda v: min(max(v, 0), H - 1))
    names = [s.name for s in summaries]
    patterns = head_patterns(int(layer), int(head))
    figure(figures.attention_patterns(names, patterns, int(layer), int(head), result.tokens), "attention_pattern",
           tables.pattern_frame(labels, patterns, int(layer), int(head), result.tokens))
