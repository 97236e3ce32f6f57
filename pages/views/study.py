"""Study: the papers' corpus-level claims, for several models at once, with 95% intervals."""

import json

import streamlit as st

from noln_core.study import to_json
from noln_core.study.benchmark import benchmark_csv_rows, benchmark_json, benchmark_markdown
from noln_core.study.report import markdown
from noln_core.viz import study as viz
from pages.shell import benchmark, study
from pages.shell.display import csv, figure, md
from pages.shell.runs import run_specs

st.header("Study: a corpus, many models")
st.markdown(
    "One prompt cannot show the papers' claims with confidence; a corpus can. A study runs every model over the same "
    "sequences (the papers' convention: documents joined by `<|endoftext|>`, cut into chunks, no BOS) and reports "
    "each number with a 95% interval over sequences. From the command line, and on several GPUs: "
    "`python -m noln_core study` (see the README)."
)
request = study.request_input()
result = study.run(request) if request is not None else None
if result is not None:
    if not result.complete:
        st.warning(f"Stopped after {result.n_sequences} sequences: these numbers cover them only. What was done is "
                   "saved; press Run study to resume.", icon=":material/pause_circle:")
    st.caption(f"{result.n_sequences} sequences of {result.seq_len} tokens from {md(result.corpus)}"
               f"{', BOS first' if result.bos else ', no BOS'}.")
    figure(viz.ce_intervals(result), "study_ce", viz.summary_frame(result))
    figure(viz.loss_by_position(result), "study_loss_by_position")
    st.markdown("Without LayerNorm the first positions, which lack context, behave differently: compare the left end.")
    if any(m.reliability is not None for m in result.models):
        figure(viz.reliability(result), "study_reliability")
        st.markdown("Below the diagonal a model is overconfident; Baroni et al. 2025 found LN-free models are "
                    "(GPT-2 medium: calibration error 0.019 → 0.034).")
    if any(m.nmae is not None for m in result.models):
        figure(viz.nmae_intervals(result), "study_nmae")
        st.markdown("Without LayerNorm the readout is linear, so DLA *is* the direct effect: 0% error. The papers "
                    "measured 49.07% for GPT-2 small (last-token target, 1000 × 512-token Pile sequences).")
    if any(m.first_token_norm is not None for m in result.models):
        figure(viz.first_token_norms(result), "study_first_token_norm")
    if result.pairs:
        names = [f"{p.a} vs {p.b}" for p in result.pairs]
        which = st.selectbox("Pair", range(len(names)), format_func=lambda i: names[i], key="w_study_pair")
        figure(viz.loss_difference_histogram(result, which), "study_loss_difference")
        st.subheader("Where the two part ways")
        st.dataframe(viz.parting_frame(result, which), hide_index=True)
        csv(viz.pairs_frame(result), "study_pairs")
    st.subheader("Exploding tokens")
    frame = viz.exploding_frame(result)
    if len(frame):
        st.dataframe(frame, hide_index=True)
    else:
        st.caption("None: no position's loss or last-layer norm passed the thresholds.")
    csv(frame, "study_exploding")
    doc = to_json(result)
    c1, c2 = st.columns(2)
    c1.download_button("JSON: study", json.dumps(doc, ensure_ascii=False, indent=1).encode(), "study.json",
                       "application/json", key="dl_study_json")
    c2.download_button("Markdown: study table", markdown(doc).encode(), "study.md", "text/markdown", key="dl_study_md")

st.header("Benchmarks")
st.markdown(
    "Accuracy on the harness researchers use: EleutherAI's lm-evaluation-harness runs its own tasks on the sidebar's "
    "models, each loaded exactly and handed over as an ordinary `transformers` module, and scores them itself. The "
    "follow-up paper reports HellaSwag acc_norm 0.312 for GPT-2 small this way; Heimersheim 2024's 29.56% is likely "
    "the completion-style scoring. From the command line: `python -m noln_core benchmark --tasks hellaswag,mmlu`."
)
if "_model_specs" in st.session_state:
    bench = benchmark.section(run_specs())
    if bench is not None:
        import pandas as pd

        frame = pd.DataFrame(benchmark_csv_rows(bench))
        st.dataframe(frame, hide_index=True, height=35 * (len(frame) + 1) + 3)
        c1, c2 = st.columns(2)
        c1.download_button("JSON: benchmark", json.dumps(benchmark_json(bench), indent=1).encode(), "benchmark.json",
                           "application/json", key="dl_bench_json")
        c2.download_button("Markdown: benchmark", benchmark_markdown(bench).encode(), "benchmark.md", "text/markdown",
                           key="dl_bench_md")
else:
    st.info("Choose models in the sidebar to benchmark them.")
