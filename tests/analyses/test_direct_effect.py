"""Per-head direct effect, against an independent recomputation with HF's own final LayerNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import PROMPTS, hf_readout, hf_run
from noln_core import compare, head_direct_effects


@pytest.fixture(scope="module")
def result(ln_model, noln_model):
    return compare([ln_model, noln_model], PROMPTS[0], " Mary", " John")


def _value_bias(model, layer):
    """b_V with ln_1's bias folded in (what TransformerLens' fold_value_biases moves into b_O)."""
    block, d = model.transformer.h[layer], model.config.n_embd
    W_V = block.attn.c_attn.weight.double()[:, 2 * d:]
    return block.attn.c_attn.bias.double()[2 * d:] + block.ln_1.bias.double() @ W_V


def _hf_direct_effects(directory, result, value_bias="head"):
    """DE_h = f(x) - f(x - r_h) with HF's ln_f and lm_head, r_h from HF's c_proj input (less b_V with ``b_O``)."""
    ref = hf_run(directory, list(result.token_ids))
    model, p, t = ref["model"], result.position, result.target
    x = ref["hidden"][-1][p]
    H = model.config.n_head
    dh = model.config.n_embd // H
    out = np.zeros((model.config.n_layer, H))
    full = hf_readout(model, x, t.answer_id, t.counterfactual_id)
    for layer in range(model.config.n_layer):
        W_O = model.transformer.h[layer].attn.c_proj.weight.double()
        z = ref["z"][layer][p] - (_value_bias(model, layer) if value_bias == "b_O" else 0)
        for h in range(H):
            r = z[h * dh:(h + 1) * dh] @ W_O[h * dh:(h + 1) * dh]
            out[layer, h] = float(full - hf_readout(model, x - r, t.answer_id, t.counterfactual_id))
    return out


def test_direct_effect_equals_hf_recomputation(result, ln_dir, noln_dir):
    for effect, directory in zip(head_direct_effects(result), (ln_dir, noln_dir)):
        np.testing.assert_allclose(effect.direct_effect, _hf_direct_effects(directory, result), atol=1e-4)


@pytest.mark.parametrize("value_bias", ["head", "b_O"])
def test_ln_free_dla_equals_direct_effect(result, value_bias):
    effect = head_direct_effects(result, value_bias)[1]
    assert effect.ln_free and effect.nmae < 1e-5 and effect.value_bias == value_bias
    np.testing.assert_allclose(effect.dla, effect.direct_effect, atol=1e-6)


def test_direct_effect_without_value_biases_equals_hf(result, ln_dir, noln_dir):
    """The papers' convention: each head's write without b_V; with LN both DLA and DE move, and so the NMAE."""
    effects = head_direct_effects(result, "b_O")
    for effect, directory in zip(effects, (ln_dir, noln_dir)):
        np.testing.assert_allclose(effect.direct_effect, _hf_direct_effects(directory, result, "b_O"), atol=1e-4)
    assert effects[0].nmae != pytest.approx(head_direct_effects(result)[0].nmae, rel=1e-3)


def _hf_head_dla(directory, result):
    """DLA_h with HF's own numbers: the head's write, centred, divided by HF's ln_f scale at p, through lm_head."""
    ref = hf_run(directory, list(result.token_ids))
    model, p, t = ref["model"], result.position, result.target
    x = ref["hidden"][-1][p]
    scale = float((((x - x.mean()) ** 2).mean() + model.config.layer_norm_epsilon).sqrt())
    w_f = model.transformer.ln_f.weight.double()
    W_U = model.lm_head.weight.double()
    u = w_f * (W_U[t.answer_id] - W_U[t.counterfactual_id])
    H = model.config.n_head
    dh = model.config.n_embd // H
    out = np.zeros((model.config.n_layer, H))
    for layer in range(model.config.n_layer):
        W_O = model.transformer.h[layer].attn.c_proj.weight.double()
        for h in range(H):
            r = ref["z"][layer][p, h * dh:(h + 1) * dh] @ W_O[h * dh:(h + 1) * dh]
            out[layer, h] = float(((r - r.mean()) @ u) / scale)
    return out


def test_nmae_equals_the_one_from_transformers_alone(result, ln_dir, noln_dir):
    """NMAE over heads, with DLA and direct effect both recomputed from HF: positive with LN, zero without."""
    for effect, directory in zip(head_direct_effects(result), (ln_dir, noln_dir)):
        dla, de = _hf_head_dla(directory, result), _hf_direct_effects(directory, result)
        np.testing.assert_allclose(effect.dla, dla, atol=1e-4)
        assert effect.nmae == pytest.approx(np.abs(dla - de).sum() / np.abs(de).sum(), abs=1e-4)
    assert head_direct_effects(result)[0].nmae > 1e-3


def test_computed_from_one_run_without_further_forward_passes(ln_model, noln_model, monkeypatch):
    """All heads' direct effects come from the cached run: the analysis never calls a model."""
    result = compare([ln_model, noln_model], PROMPTS[1], " Paris", " London")
    calls = []
    for model in (ln_model, noln_model):
        monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1) or torch.zeros(0))
    effects = head_direct_effects(result)
    assert not calls and effects[0].direct_effect.shape == (3, 4)
