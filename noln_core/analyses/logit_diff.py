"""Logit difference between an answer and a counterfactual token, and its logit lens.

The logit lens reads the logit difference off the residual stream at the
analysed position after every sublayer (``resid_pre`` and ``resid_mid`` of each
layer, then the final ``resid_post``), applying each model's own final-norm
convention (:mod:`noln_core.readout`): models with LN recompute the final
LayerNorm on each intermediate residual, LN-free models read it linearly.  The
last lens value therefore equals the model's logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..readout import readout


@dataclass(frozen=True)
class LogitDiff:
    """One model's logit difference and its lens."""

    name: str
    ln_free: bool
    value: float
    """``logit[answer] - logit[counterfactual]`` at the position, from the model's output."""
    lens: np.ndarray
    """(2L + 1,) the same quantity read from the accumulated residual after each sublayer."""
    lens_labels: tuple[str, ...]
    """Aligned with ``lens``: ``L0 pre``, ``L0 mid``, ``L1 pre``, ..., ``final``."""


@dataclass(frozen=True)
class LogitDiffAnalysis:
    answer: str
    counterfactual: str
    position: int
    models: tuple[LogitDiff, ...]


def logit_difference(result) -> LogitDiffAnalysis | None:
    """Logit difference and logit lens for every model; None when the run has no target."""
    if result.target is None:
        return None
    models = []
    for run in result.runs:
        att = run.attribution
        lens = readout(att.accumulated, att.u, att.constant, att.eps, att.ln_free)
        models.append(LogitDiff(run.name, att.ln_free, att.logit_diff, lens, att.accumulated_labels))
    return LogitDiffAnalysis(result.target.answer, result.target.counterfactual, result.position, tuple(models))
