"""Residual-stream norms and LayerNorm scales equal a recomputation from HF hidden states."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import PROMPTS, hf_run, ln_stats
from noln_core import compare, residual_norms


@pytest.fixture(scope="module")
def result(ln_model, noln_model):
    return compare([ln_model, noln_model], PROMPTS[3])


def test_norms_equal_hf_hidden_states(result, ln_dir, noln_dir):
    for norms, directory in zip(residual_norms(result), (ln_dir, noln_dir)):
        ref = hf_run(directory, list(result.token_ids))
        hidden = np.stack([h.norm(dim=-1).numpy() for h in ref["hidden"]])
        np.testing.assert_allclose(norms.hidden, hidden, rtol=1e-5)
        np.testing.assert_allclose(norms.resid_pre, hidden[:-1], rtol=1e-5)
        np.testing.assert_allclose(norms.resid_post[:-1], hidden[1:-1], rtol=1e-5)
        mid = np.stack([m.norm(dim=-1).numpy() for m in ref["resid_mid"]])
        np.testing.assert_allclose(norms.resid_mid, mid, rtol=1e-5)
        assert norms.first_token_max == pytest.approx(hidden[:, 0].max(), rel=1e-5)


def test_ln_scales_equal_recomputation(result, ln_dir):
    norms = residual_norms(result)[0]
    ref = hf_run(ln_dir, list(result.token_ids))
    for layer in range(3):
        np.testing.assert_allclose(norms.ln1_scale[layer], ln_stats(ref["hidden"][layer], 1e-5).numpy(), rtol=1e-5)
        np.testing.assert_allclose(norms.ln2_scale[layer], ln_stats(ref["resid_mid"][layer], 1e-5).numpy(), rtol=1e-5)
    np.testing.assert_allclose(norms.ln_final_scale, ln_stats(ref["hidden"][-1], 1e-5).numpy(), rtol=1e-5)


def test_ln_free_model_reports_no_scales(result):
    norms = residual_norms(result)[1]
    assert norms.ln_free and norms.ln1_scale is None and norms.ln2_scale is None and norms.ln_final_scale is None


def test_hf_deviation_is_reported_for_ln_free_models(result, noln_model):
    run = result.runs[1]
    assert run.hf_deviation is not None and 0 <= run.hf_deviation < 1e-6
    assert result.runs[0].hf_deviation is None
