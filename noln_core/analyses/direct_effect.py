"""Each head's direct effect on the logit difference, against its DLA.

The *direct effect* of head ``h`` is the true change in the logit difference
when only its direct path to the unembedding is removed: ``f(x) - f(x - r_h)``
where ``x`` is the final residual stream at the position, ``r_h`` the head's
write there and ``f`` the model's readout with the final LayerNorm
*recomputed* (:mod:`noln_core.readout`).  Removing a head's direct path leaves
every other component unchanged, so this is computed for all heads at once
from one cached run, with no further forward pass.

DLA instead divides ``r_h`` by the cached final scale.  The normalised mean
absolute error ``NMAE = sum_h |DLA_h - DE_h| / sum_h |DE_h|`` measures how far
that is from the truth.  Baroni et al. 2025 (arXiv:2507.02559) report 49.07%
for GPT-2 small, 57.85% for its fine-tune with LN and 0.00% for the LN-free
model over 1000 x 512-token sequences; here it is for one prompt and position.
For an LN-free model ``f`` is affine and ``DE_h = DLA_h`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..readout import readout
from .attribution import head_dla, head_outputs


@dataclass(frozen=True)
class HeadDirectEffect:
    """One model's per-head DLA and direct effect (L layers, H heads)."""

    name: str
    ln_free: bool
    dla: np.ndarray
    """(L, H) DLA with the cached final scale."""
    direct_effect: np.ndarray
    """(L, H) true change of the logit difference when the head's direct path is removed."""
    nmae: float
    """``sum |dla - direct_effect| / sum |direct_effect|`` (0 when every direct effect is 0)."""
    value_bias: str = "head"
    """Where each head's value bias is counted (``head`` or ``b_O``; :mod:`.attribution`)."""


def head_direct_effects(result, value_bias: str = "head") -> tuple[HeadDirectEffect, ...] | None:
    """Per-head direct effects for every model; None when the run has no target.

    ``value_bias``: whether a head's write includes its value bias (``head``) or leaves it to ``b_O`` (the
    papers' TransformerLens convention); the direct effect removes whatever the head is taken to write.
    """
    if result.target is None:
        return None
    out = []
    for run in result.runs:
        att = run.attribution
        x = att.accumulated[-1].astype(np.float64)
        r = head_outputs(att, value_bias)
        full = readout(x, att.u, att.constant, att.eps, att.ln_free)
        without = readout(x[None, None, :] - r, att.u, att.constant, att.eps, att.ln_free)
        effect = full - without
        dla = head_dla(att, value_bias)
        denom = float(np.abs(effect).sum())
        nmae = float(np.abs(dla - effect).sum() / denom) if denom > 0 else 0.0
        out.append(HeadDirectEffect(run.name, att.ln_free, dla, effect, nmae, value_bias))
    return tuple(out)
