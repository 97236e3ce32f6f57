"""Activation patching against attribution patching, side by side."""

import streamlit as st

from noln_core import NolnError
from noln_core.findings.ioi import ioi_pairs
from noln_core.findings.patching import swapped_prompt
from noln_core.viz import findings
from pages.shell import cache, limits
from pages.shell.display import error, figure, md
from pages.shell.runs import current_run, patchings, run_specs
from pages.shell.state import request_state, set_state, state

st.header("Patching: is attribution patching exact without LayerNorm?")
result = current_run()
if result is not None:
    st.markdown(
        "Activation patching copies one activation of a *clean* run into a *corrupted* run and measures how much of "
        "the logit difference comes back; attribution patching estimates all of them at once from one gradient. "
        "Removing LN makes the readout linear, so the estimate is exact for the stream that enters the unembedding "
        "(the *final* row), but not inside the blocks: the papers found it **no more accurate without LN**."
    )
    if st.button("Use an IOI pair from the papers' template", key="w_ioi_example"):
        models = [cache.load(*spec) for spec in run_specs()]
        pair = ioi_pairs(4, seed=0, tokenizer=models[0].tokenizer,  # names every model has an unembedding for
                         usable=lambda i: all(bool(m.weights.W_U_rows[i].any()) for m in models))[0]
        request_state(text=pair.clean, corrupted=pair.corrupted, answer=pair.answer, counterfactual=pair.counterfactual,
                      position=-1)
    s = state()
    if result.target is None or s.answer is None or s.counterfactual is None:
        st.info("Pick an answer and a counterfactual token in the sidebar: the metric is their logit difference.")
    else:
        automatic = swapped_prompt(result.text, s.answer, s.counterfactual)
        shown = s.corrupted if s.corrupted is not None else automatic
        if st.session_state.get("w_corrupted_shown") != shown:
            st.session_state["w_corrupted"] = st.session_state["w_corrupted_shown"] = shown

        def keep() -> None:
            typed = st.session_state["w_corrupted"]
            set_state(corrupted=None if typed == automatic else typed)
            st.session_state["w_corrupted_shown"] = typed

        corrupted = st.text_input("Corrupted prompt (same token length as the text)", key="w_corrupted",
                                  on_change=keep, help="By default the text with the answer and the counterfactual "
                                                       "swapped. The clean prompt is the sidebar's text.")
        if result.n_tokens > limits.LIMITS.patch_max_tokens:
            st.error(f"Patching takes texts of up to {limits.LIMITS.patch_max_tokens} tokens here; this one has "
                     f"{result.n_tokens}. Shorten the text.", icon=":material/error:")
        else:
            try:
                results = patchings(corrupted, s.answer, s.counterfactual)
            except NolnError as err:
                error(str(err))
            else:
                for col, r in zip(st.columns(len(results)), results):
                    col.metric(f"{md(r.name)}: NMAE over layer × position", f"{r.resid_agreement.nmae:.1%}")
                    col.caption(f"clean {r.clean_metric:+.3f}, corrupted {r.corrupted_metric:+.3f}; correlation "
                                f"{r.resid_agreement.correlation:.3f}; heads NMAE {r.z_agreement.nmae:.1%}. Final "
                                f"stream, last position: attribution {r.resid_attr[-1, -1]:+.5f} against "
                                f"{r.resid_act[-1, -1]:+.5f}"
                                + (" (equal: the LN-free readout is linear)." if r.ln_free else " (the LN bends it)."))
                frame = findings.patching_frame(results, result.tokens)
                figure(findings.patching_heatmaps(results, result.tokens), "patching_resid_pre", frame)
                figure(findings.patching_scatter(results), "patching_scatter", frame)
                figure(findings.head_patching_heatmaps(results), "patching_heads")
                st.caption("Both are divided by clean − corrupted, as the papers' analysis does. Over 480 IOI pairs: "
                           "`python -m noln_core patch --ioi 480 --model … --out DIR`.")
