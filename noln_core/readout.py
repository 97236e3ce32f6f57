"""The final readout of a logit difference from a residual-stream vector.

``logit[a] - logit[b] = (C x / sigma(x)) . u + const`` where ``C`` centres,
``u = C (w_f * (W_U[a] - W_U[b]))`` and ``const = b_U[a] - b_U[b]``.  For a
model with LayerNorm ``sigma(x) = sqrt(var(x) + eps)`` depends on ``x``, so
the readout is not linear.  For an LN-free model ``sigma = 1`` and the readout
is affine: this is the whole reason attribution is exact there.
"""

from __future__ import annotations

import numpy as np


def final_scale(x: np.ndarray, eps: float, ln_free: bool) -> np.ndarray:
    """The final LN divisor of each row of ``x`` (..., d): ``sqrt(var + eps)``, or 1 for LN-free models."""
    if ln_free:
        return np.ones(x.shape[:-1])
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    return np.sqrt((centred**2).mean(-1) + eps)


def readout(x: np.ndarray, u: np.ndarray, constant: float, eps: float, ln_free: bool) -> np.ndarray:
    """Logit difference read from residual vectors ``x`` (..., d) with the model's own final norm recomputed."""
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    return (centred @ u.astype(np.float64)) / final_scale(x, eps, ln_free) + constant
