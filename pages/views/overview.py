"""Overview: next-token predictions, per-token loss, divergences, agreement."""

import numpy as np
import pandas as pd
import streamlit as st

from noln_core.analyses import next_token
from noln_core.viz import figures, tables
from pages.shell.display import csv, figure, md
from pages.shell.runs import analysis, current_run

st.header("Overview: what each model predicts")
result = current_run()
if result is not None:
    nt = analysis(next_token)
    labels = tables.model_labels(r.name for r in result.runs)
    cols = st.columns(len(nt.models) + len(nt.pairs))
    for col, label, m in zip(cols, labels, nt.models):
        col.metric(f"Mean loss · {md(label)}", f"{m.mean_loss:.3f} nats" if np.isfinite(m.mean_loss) else "—")
    for col, pair in zip(cols[len(nt.models):], nt.pairs):
        col.metric(f"Top-1 agreement · {tables.pair_label(pair)}", f"{pair.agreement:.1%}")
    st.markdown(
        "Both models read the **same token ids**. Below: each model's most likely next tokens at the analysed "
        "position, how surprised each is by every actual next token, and how far apart their predictions are. "
        "An LN-free fine-tune should predict almost like GPT-2 (the papers report a loss gap of a few hundredths of "
        "a nat); where they part is where normalisation mattered."
    )
    st.subheader(f"Next-token predictions at position {result.position} ({md(repr(result.tokens[result.position]))})")
    top = tables.top_predictions_frame(result)
    for i, (col, label) in enumerate(zip(st.columns(len(labels)), labels)):
        own = top[top["model"] == label]
        other = labels[1] if i == 0 and len(labels) > 1 else labels[0]
        letter, other_letter = label[0], other[0]
        shown = pd.DataFrame({
            "rank": own["rank"], "token": own["token"].map(repr), f"p ({letter})": own[f"p[{label}]"],
            f"p ({other_letter})": own[f"p[{other}]"], f"{letter} − {other_letter}": own[f"p[{label}]"] - own[f"p[{other}]"],
        })
        col.markdown(f"**{md(label)}**")
        col.dataframe(shown, hide_index=True)
    csv(top, "top_predictions")
    per_token = tables.per_token_frame(result, nt)
    if result.n_tokens > 1:
        figure(figures.loss_strip(nt, result.tokens), "per_token_loss", per_token)
    if nt.pairs:
        figure(figures.divergence_chart(nt, result.tokens), "divergences", per_token)
