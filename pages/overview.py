"""Overview: next-token predictions, per-token loss, divergences, agreement."""

import numpy as np
import streamlit as st

from noln_core import figures, tables
from pages import _common as app

app.page("overview")
st.header("Overview: what each model predicts")
result = app.current_run()
if result is not None:
    nt = app.analysis("next_token")
    cols = st.columns(len(nt.models) + len(nt.pairs))
    for col, m in zip(cols, nt.models):
        col.metric(f"Mean loss · {m.name}", f"{m.mean_loss:.3f} nats" if np.isfinite(m.mean_loss) else "—")
    for col, pair in zip(cols[len(nt.models):], nt.pairs):
        col.metric(f"Top-1 agreement · {pair.a} vs {pair.b}", f"{pair.agreement:.1%}")
    st.markdown(
        "Both models read the **same token ids**. Below: each model's most likely next tokens at the analysed "
        "position, how surprised each is by every actual next token, and how far apart their predictions are. "
        "An LN-free fine-tune should predict almost like GPT-2 (the papers report a loss gap of a few hundredths of "
        "a nat); where they part is where normalisation mattered."
    )
    st.subheader(f"Next-token predictions at position {result.position} ({result.tokens[result.position]!r})")
    top = tables.top_predictions_frame(result)
    names = [r.name for r in result.runs]
    for col, name in zip(st.columns(len(names)), names):
        own = top[top["model"] == name]
        other = next((n for n in names if n != name), name)
        shown = own.assign(token=own["token"].map(repr), difference=own[f"p[{name}]"] - own[f"p[{other}]"])
        col.markdown(f"**{name}**")
        col.dataframe(shown[["rank", "token", f"p[{name}]", f"p[{other}]", "difference"]]
                      .rename(columns={f"p[{name}]": "p (this)", f"p[{other}]": f"p (other: {other})"}),
                      hide_index=True)
    st.download_button("CSV: top predictions", top.to_csv(index=False).encode(), "top_predictions.csv", "text/csv")
    per_token = tables.per_token_frame(result, nt)
    if result.n_tokens > 1:
        app.figure(figures.loss_strip(nt, result.tokens), "per_token_loss", per_token)
    if nt.pairs:
        app.figure(figures.divergence_chart(nt, result.tokens), "divergences", per_token)
