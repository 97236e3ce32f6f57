"""The analyses: each module is one pure function from a :class:`~noln_core.compare.RunResult` to a documented
frozen dataclass, computing nothing the run did not keep.  This layer imports only the run and the maths below it.

``ANALYSES`` is the one list of them, in the order the app's pages use them.
"""

from .attention import AttentionSummary, attention
from .attribution import DirectLogitAttribution, direct_logit_attribution, exactness_tolerance, head_dla, project
from .direct_effect import HeadDirectEffect, head_direct_effects
from .logit_diff import LogitDiffAnalysis, logit_difference
from .next_token import NextTokenAnalysis, next_token
from .residual_norms import ResidualNorms, residual_norms

ANALYSES = (next_token, logit_difference, residual_norms, direct_logit_attribution, head_direct_effects, attention)
"""Every analysis function, each ``f(result) -> dataclass`` (or None where it needs a target the run lacks)."""

__all__ = [
    "ANALYSES", "AttentionSummary", "DirectLogitAttribution", "HeadDirectEffect", "LogitDiffAnalysis",
    "NextTokenAnalysis", "ResidualNorms", "attention", "direct_logit_attribution", "exactness_tolerance",
    "head_direct_effects", "head_dla", "logit_difference", "next_token", "project",
    "residual_norms",
]
