"""Direct logit attribution: components + constant = logit difference; exact for LN-free models."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import PROMPTS, hf_run
from noln_core import compare, direct_logit_attribution
from noln_core.analyses import exactness_tolerance

CASES = [(PROMPTS[0], " Mary", " John", -1), (PROMPTS[1], " Paris", " London", -1),
         (PROMPTS[2], " three", " four", 5), (PROMPTS[3], "\t", "\n", -2)]


@pytest.fixture(scope="module", params=range(len(CASES)))
def case(request, ln_model, noln_model):
    text, a, b, pos = CASES[request.param]
    return compare([ln_model, noln_model], text, a, b, pos)


def test_logit_diff_equals_hf(case, ln_dir, noln_dir):
    ids, p, t = list(case.token_ids), case.position, case.target
    for dla, directory in zip(direct_logit_attribution(case), (ln_dir, noln_dir)):
        logits = hf_run(directory, ids)["logits"][p]
        assert dla.logit_diff == pytest.approx(float(logits[t.answer_id] - logits[t.counterfactual_id]), abs=1e-4)


def test_ln_free_dla_is_exact(case):
    dla = direct_logit_attribution(case)[1]
    assert dla.ln_free and dla.exact and dla.scale == 1.0
    assert abs(dla.values.sum() + dla.constant - dla.logit_diff) <= exactness_tolerance(dla.logit_diff)
    assert dla.error <= exactness_tolerance(dla.logit_diff)


def test_ln_model_components_and_constant_equal_a_recomputation_from_transformers(case, ln_dir):
    """With LN: every component's write, taken from HF's hidden states, divided by HF's own ln_f scale at the
    position and read through lm_head, equals our DLA; with the constant they add up to HF's logit difference."""
    ids, p, t = list(case.token_ids), case.position, case.target
    ref = hf_run(ln_dir, ids)
    model, hidden, mid = ref["model"], ref["hidden"], ref["resid_mid"]
    W_U, tr = model.lm_head.weight.double(), model.transformer
    diff = W_U[t.answer_id] - W_U[t.counterfactual_id]
    u = tr.ln_f.weight.double() * diff
    x = hidden[-1][p]
    scale = float((((x - x.mean()) ** 2).mean() + model.config.layer_norm_epsilon).sqrt())
    writes = [tr.wte.weight.double()[ids[p]], tr.wpe.weight.double()[p]]
    for layer in range(model.config.n_layer):
        writes += [mid[layer][p] - hidden[layer][p], hidden[layer + 1][p] - mid[layer][p]]
    expected = np.array([float((w - w.mean()) @ u) / scale for w in writes])
    constant = float(tr.ln_f.bias.double() @ diff)
    logits = ref["logits"][p]
    dla = direct_logit_attribution(case)[0]
    assert not dla.exact and dla.scale == pytest.approx(scale, rel=1e-5) and "cached scale" in dla.method
    np.testing.assert_allclose(dla.values, expected, atol=1e-4)
    assert dla.constant == pytest.approx(constant, abs=1e-4)
    hf_diff = float(logits[t.answer_id] - logits[t.counterfactual_id])
    assert dla.values.sum() + dla.constant == pytest.approx(hf_diff, abs=1e-4)
    assert expected.sum() + constant == pytest.approx(hf_diff, abs=1e-4)


def test_constant_is_the_final_ln_bias_through_the_unembedding(case, noln_dir):
    model = hf_run(noln_dir, list(case.token_ids))["model"]
    W_E, b_f = model.transformer.wte.weight.double(), model.transformer.ln_f.bias.double()
    t = case.target
    expected = float(b_f @ (W_E[t.answer_id] - W_E[t.counterfactual_id]))
    dla = direct_logit_attribution(case)[1]
    assert dla.constant == pytest.approx(expected, abs=1e-5)


def test_leaving_out_the_constant_breaks_the_sum(ln_model, noln_model):
    """The usual DLA (no constant) misses the logit difference by exactly the constant, which is not small here."""
    dla = direct_logit_attribution(compare(noln_model, PROMPTS[0], " Mary", " John"))[0]
    assert abs(dla.constant) > 100 * exactness_tolerance(dla.logit_diff)
    assert abs(dla.values.sum() - dla.logit_diff) == pytest.approx(abs(dla.constant), abs=1e-4)


@pytest.mark.parametrize("value_bias", ["head", "b_O"])
def test_finer_splits_add_up(case, value_bias):
    for dla in direct_logit_attribution(case, value_bias=value_bias):
        attn, mlp = dla.values[2::2], dla.values[3::2]
        assert dla.value_bias == value_bias
        np.testing.assert_allclose(dla.heads.sum(1) + dla.attn_bias, attn, atol=1e-5)
        np.testing.assert_allclose(dla.head_source.sum(-1), dla.heads, atol=1e-5)
        np.testing.assert_allclose(dla.neurons.sum(1) + dla.mlp_bias, mlp, atol=1e-4)
        assert dla.labels[:4] == ("embed", "pos_embed", "L0 attn", "L0 mlp")


def test_head_dla_equals_recomputation_from_hf(case, noln_dir):
    """Each head's write z_h W_O^h, from HF's own c_proj input, read out linearly, equals our head DLA."""
    ref = hf_run(noln_dir, list(case.token_ids))
    model, p, t = ref["model"], case.position, case.target
    dla = direct_logit_attribution(case)[1]
    W_E = model.transformer.wte.weight.double()
    w_f = model.transformer.ln_f.weight.double() / 1e6
    u = w_f * (W_E[t.answer_id] - W_E[t.counterfactual_id])
    u = u - u.mean()
    H = model.config.n_head
    dh = model.config.n_embd // H
    for layer in range(model.config.n_layer):
        W_O = model.transformer.h[layer].attn.c_proj.weight.double()
        z = ref["z"][layer][p]
        for h in range(H):
            out = z[h * dh:(h + 1) * dh] @ W_O[h * dh:(h + 1) * dh]
            assert dla.heads[layer, h] == pytest.approx(float((out - out.mean()) @ u), abs=1e-5)


def test_value_biases_in_b_o_move_between_heads_and_bias_only(case, ln_dir, noln_dir):
    """The papers' convention (TransformerLens' fold_value_biases): each head's write is (z_h - b_V^h) W_O^h, b_V
    with ln_1's bias folded in; the layer's bias term takes the rest, and the components and the sum stay exact."""
    heads_in_head = direct_logit_attribution(case)
    heads_in_bias = direct_logit_attribution(case, value_bias="b_O")
    p, t = case.position, case.target
    for a, b, directory in zip(heads_in_head, heads_in_bias, (ln_dir, noln_dir)):
        np.testing.assert_array_equal(a.values, b.values)
        assert b.error == a.error and b.constant == a.constant
        np.testing.assert_allclose(b.heads.sum(1) + b.attn_bias, a.heads.sum(1) + a.attn_bias, atol=1e-5)
        ref = hf_run(directory, list(case.token_ids))
        model = ref["model"]
        W_E = model.transformer.wte.weight.double()
        w_f = model.transformer.ln_f.weight.double() / (1e6 if a.ln_free else 1.0)
        u = w_f * (W_E[t.answer_id] - W_E[t.counterfactual_id])
        u = u - u.mean()
        H, d = model.config.n_head, model.config.n_embd
        dh = d // H
        for layer, block in enumerate(model.transformer.h):
            W_V = block.attn.c_attn.weight.double()[:, 2 * d:]
            b_V = block.attn.c_attn.bias.double()[2 * d:] + block.ln_1.bias.double() @ W_V
            W_O = block.attn.c_proj.weight.double()
            z = ref["z"][layer][p] - b_V
            for h in range(H):
                out = z[h * dh:(h + 1) * dh] @ W_O[h * dh:(h + 1) * dh]
                assert b.heads[layer, h] == pytest.approx(float((out - out.mean()) @ u) / b.scale, abs=1e-5)
    assert not np.allclose(heads_in_head[0].heads, heads_in_bias[0].heads, atol=1e-4)  # a real difference
    with pytest.raises(ValueError, match="value-bias"):
        direct_logit_attribution(case, value_bias="nowhere")


def test_top_neurons_are_the_largest(case):
    dla = direct_logit_attribution(case)[1]
    top = dla.top_neurons(5)
    assert len(top) == 5
    values = [abs(v) for _, _, v in top]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(np.abs(dla.neurons).max())
    layer, neuron, value = top[0]
    assert dla.neurons[layer, neuron] == value


def test_no_target_no_attribution(ln_model):
    assert direct_logit_attribution(compare(ln_model, "Hello")) is None
