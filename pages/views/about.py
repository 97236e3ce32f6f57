"""About: what LN-free models are, the papers' numbers, how to cite."""

import streamlit as st

import noln_core
from noln_core.registry import PUBLISHED_CE_BARONI, PUBLISHED_CE_HEIMERSHEIM
from noln_core.training.demo import explain, shipped_metrics
from noln_core.training.demo import table as demo_table

st.header("About noLN Explorer")
st.markdown(
    """
**LayerNorm-free GPT-2.** Every LayerNorm divides the residual stream by its own standard deviation, which makes a
transformer nonlinear from the residual stream to the logits. Heimersheim (2024) showed that GPT-2 can be
fine-tuned to do without it: each LN is replaced by a frozen scale, one at a time, while training continues.
Baroni et al. (2025) did it for every GPT-2 size. Without LN the map from the residual stream to the logits is
affine, so **direct logit attribution is exact**.

The published checkpoints are ordinary `GPT2LMHeadModel`s that neutralise LN by a trick (LN weight ×1e6, eps
1e12). This app detects the trick from the checkpoint and runs the model with no normalisation at all; it also
keeps the final LN's bias as an explicit constant term of every attribution.
"""
)
st.subheader("Headline numbers")
st.markdown("Heimersheim 2024 (GPT-2 small, `apollo-research/gpt2_noLN`), cross-entropy and accuracy:")
owt, pile = PUBLISHED_CE_HEIMERSHEIM["OpenWebText"], PUBLISHED_CE_HEIMERSHEIM["Pile"]
st.table({
    "": ["OpenWebText CE", "The Pile CE", "HellaSwag"],
    "original GPT-2": [f"{owt[0]:.3f}", f"{pile[0]:.3f}", "29.56%"],
    "fine-tuned with LN": [f"{owt[1]:.3f}", f"{pile[1]:.3f}", "29.82%"],
    "fine-tuned without LN": [f"{owt[2]:.3f}", f"{pile[2]:.3f}", "29.54%"],
})
st.markdown("Baroni et al. 2025, cross-entropy as original / fine-tuned with LN / LN-free:")
sizes = list(PUBLISHED_CE_BARONI["OpenWebText"])
st.table({"model": sizes, **{corpus: [" / ".join(f"{v:.4f}" for v in PUBLISHED_CE_BARONI[corpus][size]) for size in sizes]
                             for corpus in ("OpenWebText", "Pile-filtered")}})
st.markdown(
    """
- **DLA against the true direct effect** (normalised mean absolute error over all heads of GPT-2 small):
  49.07% original, 57.85% fine-tuned with LN, **0.00%** LN-free.
- **First-token residual norm**: about 3,100–3,600 with LN; about 300–500 in every layer without.
- **Attention-sink rate** (GPT-2 medium): 55.3% for the fine-tune with LN against 45.3% for the LN-free model
  (`sink_rate.py` compares those two), by their code's definition (the share of (layer, head, query) with
  attention on the first token above 0.3, over a corpus).
- **Calibration** (GPT-2 medium, original / fine-tuned with LN / LN-free): entropy 2.86 / 2.59 / 2.53, calibration
  error 0.019 / 0.022 / 0.034: LN-free models are overconfident.
- **Exploding norms**: LN-free GPT-2 XL's Pile loss is 130.22 on average because of three samples of tab and
  form-feed runs, rare in OpenWebText; try the "Rare tokens" preset.

These are corpus-level claims: the **Study** page measures them on any models and corpus, with 95% intervals,
and labels the papers' published numbers beside yours.

**Papers**

- Stefan Heimersheim, 2024. *You can remove GPT2's LayerNorm by fine-tuning.* arXiv:2409.13710.
- Luca Baroni, Galvin Khara, Joachim Schaeffer, Marat Subkhankulov, Stefan Heimersheim, 2025.
  *Transformers Don't Need LayerNorm at Inference Time.* arXiv:2507.02559.
"""
)
demo = shipped_metrics()
if demo is not None:
    st.subheader("The offline demo's three columns")
    st.markdown(
        "The shipped demo models are a small GPT-2 trained on the King James Bible (**original**), the same model "
        "fine-tuned *with* LayerNorm (**fine-tuned with LN**, `demo:gpt2-kjv-ft`, the control) and fine-tuned while "
        "its LayerNorms are removed (**LN-free**), both fine-tunes with the same data, steps, batch and learning "
        "rate. Held-out loss on chapters none of them saw:"
    )
    st.markdown("\n".join(demo_table(demo)))
    st.markdown("What each gap means (no BOS):\n\n" + "\n".join(explain(demo)))
st.subheader("How to cite this app")
st.code(
    f"""@software{{noln_explorer,
  title   = {{noLN Explorer: GPT-2 beside its LayerNorm-free fine-tunes}},
  version = {{{noln_core.__version__}}},
  year    = {{2026}},
  note    = {{Built on Heimersheim (2024), arXiv:2409.13710, and Baroni et al. (2025), arXiv:2507.02559}}
}}""",
    language="bibtex",
)
