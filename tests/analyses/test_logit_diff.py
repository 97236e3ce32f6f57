"""The logit lens of the logit difference, with each model's own final-norm convention."""

from __future__ import annotations

import pytest

from helpers import PROMPTS, hf_readout, hf_run
from noln_core import compare, logit_difference


@pytest.fixture(scope="module")
def result(ln_model, noln_model):
    return compare([ln_model, noln_model], PROMPTS[1], " Paris", " London")


def test_last_lens_value_is_the_logit_difference(result):
    for model in logit_difference(result).models:
        assert model.lens[-1] == pytest.approx(model.value, abs=1e-4)
        assert len(model.lens) == len(model.lens_labels) == 2 * 3 + 1
        assert model.lens_labels[0] == "L0 pre" and model.lens_labels[-1] == "final"


def test_lens_equals_hf_final_norm_on_each_layer(result, ln_dir, noln_dir):
    t, p = result.target, result.position
    for model, directory in zip(logit_difference(result).models, (ln_dir, noln_dir)):
        ref = hf_run(directory, list(result.token_ids))
        for layer in range(3):
            expected = hf_readout(ref["model"], ref["hidden"][layer][p], t.answer_id, t.counterfactual_id)
            assert model.lens[2 * layer] == pytest.approx(float(expected), abs=1e-4)
            mid = hf_readout(ref["model"], ref["resid_mid"][layer][p], t.answer_id, t.counterfactual_id)
            assert model.lens[2 * layer + 1] == pytest.approx(float(mid), abs=1e-4)


def test_no_target_gives_none(ln_model):
    assert logit_difference(compare(ln_model, "Hello")) is None


def test_position_is_respected(ln_model):
    a = logit_difference(compare(ln_model, PROMPTS[0], " Mary", " John", position=3))
    b = logit_difference(compare(ln_model, PROMPTS[0], " Mary", " John", position=-1))
    assert a.position == 3 and a.models[0].value != b.models[0].value
