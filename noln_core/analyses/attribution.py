"""Direct logit attribution (DLA) of a logit difference, with its constant term.

The residual stream at the analysed position ``p`` is a sum of writes:
``x = embed + pos_embed + sum_l (attn_l + mlp_l)``.  The logit difference is
read from it as ``(C x / sigma) . u + const`` (:mod:`noln_core.readout`).
Holding ``sigma`` at its cached value, each write ``c`` contributes
``(C c / sigma) . u`` and the contributions **plus the constant**
``const = b_U[a] - b_U[b]`` add up to the logit difference.  Most DLA code
drops the constant; for the LN-free checkpoints it comes from the final LN's
bias (which the tied embeddings leave nowhere to fold) and is not small.

* LN-free models: ``sigma = 1``; the readout is affine, so DLA is **exact** --
  no cached scale, no approximation (Baroni et al. 2025, arXiv:2507.02559).
* Models with LN: ``sigma`` is the final LN's cached scale at ``p``.  The sum
  still reproduces the logit difference (the ``error`` field says how well,
  in float arithmetic), but a component's DLA is not its effect: removing it
  would change ``sigma``.  :mod:`noln_core.direct_effect` measures that gap.

Finer splits: an attention layer's write is the sum of its heads
(``z_h W_O^h``) plus its bias ``b_O``; a head's write at ``p`` is a sum over
source tokens weighted by the attention pattern; an MLP's write is a sum over
neurons (``post_i W_out[i]``) plus its bias.  Each split adds up to its parent.

Where a head's *value bias* goes is a convention (``value_bias``).  Each head's
value vectors carry a bias ``b_V`` (``ln_1``'s bias folded into it); since a
head's attention sums to 1, its output holds ``b_V W_O`` whatever it attends
to.  ``"head"`` (the default here) counts that in the head.  ``"b_O"`` moves
it into the layer's bias term, as TransformerLens' default
``fold_value_biases=True`` does, and so as the papers' ``run_analysis.py``
measured heads (their 49.07% NMAE).  Either way the components, and so
components + constant = logit difference, are unchanged: only the split of a
layer between its heads and its bias moves.

We do not use TransformerLens' ``direct_logit_attribution`` here because it
returns no constant term and rejects a non-identity final norm (the LN-free
checkpoints' ``ln_f`` weight), and it needs a TransformerBridge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DirectLogitAttribution:
    """One model's DLA of ``logit[answer] - logit[counterfactual]`` at the run's position (L layers, H heads)."""

    name: str
    ln_free: bool
    exact: bool
    """True for LN-free models: each value is the component's true direct contribution."""
    labels: tuple[str, ...]
    """Components: ``embed``, ``pos_embed``, ``L0 attn``, ``L0 mlp``, ..."""
    values: np.ndarray
    """(2 + 2L,) each component's contribution, aligned with ``labels``."""
    constant: float
    """The bias term ``b_U[a] - b_U[b]``; ``values.sum() + constant`` reproduces ``logit_diff``."""
    logit_diff: float
    """The model's actual logit difference."""
    error: float
    """``|values.sum() + constant - logit_diff|``."""
    scale: float
    """Final LN scale the values were divided by (1.0 for LN-free models)."""
    heads: np.ndarray
    """(L, H) each head's contribution; a layer's heads plus ``attn_bias`` equal its ``L{l} attn`` value."""
    attn_bias: np.ndarray
    """(L,) contribution of each attention layer's output bias ``b_O``."""
    head_source: np.ndarray
    """(L, H, n) each head's contribution split by source token; sums over the last axis to ``heads``."""
    neurons: np.ndarray
    """(L, d_mlp) each MLP neuron's contribution; a layer's neurons plus ``mlp_bias`` equal its ``L{l} mlp`` value."""
    mlp_bias: np.ndarray
    """(L,) contribution of each MLP's output bias."""
    method: str
    """One line saying how the values were computed."""
    value_bias: str = "head"
    """Where each head's value bias ``b_V W_O`` is counted: ``head`` (in ``heads``) or ``b_O`` (in ``attn_bias``)."""

    def top_neurons(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` neurons with the largest absolute contribution, as ``(layer, neuron, value)``."""
        flat = self.neurons.reshape(-1)
        order = np.argsort(-np.abs(flat), kind="stable")[:k]
        d_mlp = self.neurons.shape[1]
        return [(int(i // d_mlp), int(i % d_mlp), float(flat[i])) for i in order]



def project(vectors: np.ndarray, u: np.ndarray, scale: float) -> np.ndarray:
    """DLA of residual-stream writes ``vectors`` (..., d): ``(C x) . u / scale``, in float64."""
    x = vectors.astype(np.float64)
    return ((x - x.mean(-1, keepdims=True)) @ u.astype(np.float64)) / scale


VALUE_BIAS = {
    "head": "each head's value bias b_V (with ln_1's bias) is counted in the head",
    "b_O": "each head's value bias b_V (with ln_1's bias) is counted in the layer's b_O, as TransformerLens' "
           "fold_value_biases (the papers' convention)",
}
"""The two conventions for a head's value bias, by name, each in one line."""


def head_outputs(att, value_bias: str = "head") -> np.ndarray:
    """(L, H, d) each head's write at the position under a value-bias convention (see the module docstring)."""
    if value_bias not in VALUE_BIAS:
        raise ValueError(f"unknown value-bias convention {value_bias!r}: one of {', '.join(VALUE_BIAS)}")
    out = att.head_out.astype(np.float64)
    return out if value_bias == "head" else out - att.value_bias_out


def head_dla(att, value_bias: str = "head") -> np.ndarray:
    """(L, H) each head's DLA from a run's :class:`~noln_core.compare.AttributionCapture`: the one definition,
    which :mod:`noln_core.analyses.direct_effect` sets against the true direct effect."""
    return project(head_outputs(att, value_bias), att.u, att.scale)


def direct_logit_attribution(result, value_bias: str = "head") -> tuple[DirectLogitAttribution, ...] | None:
    """DLA for every model of a :class:`~noln_core.compare.RunResult`; None when it has no target.

    ``value_bias`` says where each head's value bias is counted: ``head`` or ``b_O`` (see the module docstring).
    """
    if result.target is None:
        return None
    out = []
    for run in result.runs:
        att = run.attribution
        heads = head_dla(att, value_bias)
        attn_bias = project(att.attn_bias, att.u, att.scale)
        head_source = att.head_source.astype(np.float64) / att.scale
        if value_bias == "b_O":  # the bias part of each head, and of each source's share, moves to the layer's bias
            moved = project(att.value_bias_out, att.u, att.scale)  # (L, H)
            attn_bias = attn_bias + moved.sum(-1)
            head_source = head_source - att.source_attention.astype(np.float64) * moved[..., None]
        values = project(att.components, att.u, att.scale)
        total = float(values.sum() + att.constant)
        if att.ln_free:
            method = "exact: the model has no normalisation, so the logit difference is affine in the residual stream"
        else:
            method = (f"approximate: components divided by the final LayerNorm's cached scale ({att.scale:.4g}) at this "
                      "position; removing a component would change that scale")
        out.append(DirectLogitAttribution(
            name=run.name, ln_free=att.ln_free, exact=att.ln_free, labels=att.component_labels, values=values,
            constant=att.constant, logit_diff=att.logit_diff, error=abs(total - att.logit_diff), scale=att.scale,
            heads=heads, attn_bias=attn_bias, head_source=head_source,
            neurons=att.neurons.astype(np.float64) / att.scale,
            mlp_bias=att.mlp_bias.astype(np.float64) / att.scale, method=method, value_bias=value_bias,
        ))
    return tuple(out)


def exactness_tolerance(logit_diff: float) -> float:
    """The error bound promised for LN-free models in float32: ``1e-4 * max(1, |logit diff|)``."""
    return 1e-4 * max(1.0, abs(logit_diff))
