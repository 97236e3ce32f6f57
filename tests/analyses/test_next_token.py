"""Next-token log-probs, entropy, top-k and divergences, checked against HF outputs and by their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import PROMPTS, hf_run, hf_tokenizer
from noln_core import compare, next_token
from noln_core.divergence import js_divergence, kl_divergence


@pytest.fixture(scope="module")
def result(ln_model, noln_model):
    return compare([ln_model, noln_model], PROMPTS[0])


def test_next_token_logprobs_equal_hf(result, ln_dir, noln_dir):
    ids = list(result.token_ids)
    for run, directory in zip(result.runs, (ln_dir, noln_dir)):
        ref = hf_run(directory, ids)["logprobs"]
        expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        assert run.next_logprobs.shape == (len(ids) - 1,)
        np.testing.assert_allclose(run.next_logprobs, expected, atol=1e-4)


def test_entropy_and_top_k_equal_hf(result, ln_dir, noln_dir):
    ref = hf_run(noln_dir, list(result.token_ids))["logprobs"]
    run = result.runs[1]
    np.testing.assert_allclose(run.entropy, -(ref.exp() * ref).sum(-1).numpy(), atol=1e-4)
    top = ref[result.position].topk(10)
    np.testing.assert_array_equal(run.top_ids, top.indices.numpy())
    np.testing.assert_allclose(run.top_logprobs, top.values.numpy(), atol=1e-4)
    assert run.top_tokens == tuple(hf_tokenizer(str(noln_dir)).decode([int(i)]) for i in top.indices)
    np.testing.assert_allclose(run.position_logprobs, ref[result.position].numpy(), atol=1e-4)
    agree = (ref.argmax(-1) == hf_run(ln_dir, list(result.token_ids))["logprobs"].argmax(-1)).numpy()
    np.testing.assert_array_equal(result.pairs[0].top1_agree, agree)


def test_kl_of_a_model_with_itself_is_zero(ln_model):
    result = compare([ln_model, ln_model], PROMPTS[1])
    pair = next_token(result).pairs[0]
    assert np.all(pair.kl_ab == 0) and np.all(pair.kl_ba == 0) and np.all(pair.js == 0)
    assert pair.agreement == 1.0 and np.all(pair.loss_diff == 0)


def test_divergences_match_their_definitions(result, ln_dir, noln_dir):
    ids = list(result.token_ids)
    p, q = hf_run(ln_dir, ids)["logprobs"], hf_run(noln_dir, ids)["logprobs"]
    kl_pq = (p.exp() * (p - q)).sum(-1).numpy()
    m = (p.exp() + q.exp()) / 2
    js = 0.5 * ((p.exp() * (p - m.log())).sum(-1) + (q.exp() * (q - m.log())).sum(-1)).numpy()
    pair = result.pairs[0]
    np.testing.assert_allclose(pair.kl_ab, kl_pq, atol=1e-4)
    np.testing.assert_allclose(pair.js, js, atol=1e-4)
    assert np.all(pair.js <= math.log(2) + 1e-9) and np.all(pair.js >= 0)
    np.testing.assert_array_equal(pair.top1_agree, (p.argmax(-1) == q.argmax(-1)).numpy())


def test_js_is_symmetric_and_kl_is_not_in_general():
    torch.manual_seed(0)
    a, b = torch.randn(5, 50).log_softmax(-1), (3 * torch.randn(5, 50)).log_softmax(-1)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a), atol=1e-6)
    assert not torch.allclose(kl_divergence(a, b), kl_divergence(b, a))


def test_summary_statistics_equal_transformers(result, ln_dir, noln_dir):
    """Mean loss, top-k probabilities, per-token loss differences and top-1 agreement, recomputed from HF alone."""
    import torch

    from helpers import _hf

    analysis = next_token(result)
    ids = torch.tensor([list(result.token_ids)])
    refs = []
    for stats, directory in zip(analysis.models, (ln_dir, noln_dir)):
        with torch.no_grad():
            out = _hf(str(directory))(ids, labels=ids)
        refs.append(out.logits[0].double().log_softmax(-1))
        assert stats.mean_loss == pytest.approx(float(out.loss), abs=1e-5)  # HF's own mean cross-entropy
        top = refs[-1][result.position].exp().topk(stats.top_probs.shape[0])
        np.testing.assert_allclose(stats.top_probs, top.values.numpy(), atol=1e-5)
    hf_loss = [-lp[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy() for lp in refs]
    pair = analysis.pairs[0]
    np.testing.assert_allclose(pair.loss_diff, hf_loss[1] - hf_loss[0], atol=1e-4)
    agree = (refs[0].argmax(-1) == refs[1].argmax(-1)).double().mean().item()
    assert pair.agreement == pytest.approx(agree)
    assert (pair.a_index, pair.b_index) == (0, 1)


def test_single_token_has_no_loss(ln_model):
    stats = next_token(compare(ln_model, "x", prepend_bos=False)).models[0]
    assert stats.loss.shape == (0,) and math.isnan(stats.mean_loss)
