"""Residual-stream norms, and what each LayerNorm divides by.

The L2 norm of ``resid_pre``, ``resid_mid`` and ``resid_post`` for every layer
and position.  With LayerNorm, a huge norm (GPT-2's first token grows to about
3,000) is divided away before anything reads it; without LayerNorm it is
not, so LN-free models keep the first token's norm near 300-500 (Baroni et al.
2025).  For LN models the scale ``sqrt(var + eps)`` of ``ln_1``, ``ln_2`` and
``ln_f`` is reported too; LN-free models have none to report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResidualNorms:
    """One model's residual-stream norms over ``L`` layers and ``n`` positions."""

    name: str
    ln_free: bool
    resid_pre: np.ndarray
    """(L, n) norm entering each block."""
    resid_mid: np.ndarray
    """(L, n) norm after each attention layer."""
    resid_post: np.ndarray
    """(L, n) norm after each MLP."""
    ln1_scale: np.ndarray | None
    """(L, n) ln_1's divisor, None for LN-free models."""
    ln2_scale: np.ndarray | None
    """(L, n) ln_2's divisor."""
    ln_final_scale: np.ndarray | None
    """(n,) ln_f's divisor."""

    @property
    def hidden(self) -> np.ndarray:
        """(L + 1, n): resid_pre of every layer, then the final resid_post (before ln_f)."""
        return np.concatenate([self.resid_pre, self.resid_post[-1:]], axis=0)

    @property
    def first_token_max(self) -> float:
        """Largest norm of position 0 across layers (the BOS norm the papers discuss)."""
        return float(self.hidden[:, 0].max())


def residual_norms(result) -> tuple[ResidualNorms, ...]:
    """Norms for every model in a :class:`~noln_core.compare.RunResult`."""
    return tuple(
        ResidualNorms(
            run.name, run.info.ln_free, run.resid_pre_norm, run.resid_mid_norm, run.resid_post_norm,
            run.ln1_scale, run.ln2_scale, run.ln_final_scale,
        )
        for run in result.runs
    )
