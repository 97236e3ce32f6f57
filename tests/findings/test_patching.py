"""Activation against attribution patching: both equal the papers' script (tests/papers.py, on Hugging Face
models), per-head patching equals unbatched runs, the final row is exact without LN and not with it, and the IOI
prompts have the papers' structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import hf_model
from noln_core.errors import InputError
from noln_core.findings.ioi import TEMPLATES, ioi_group, ioi_pairs
from noln_core.findings.patching import agreement, attribution_patching, patching
from papers import attr_vs_act_patching, ioi_bisymmetric_group

CLEAN = [50256, 6423, 11, 5335, 290, 1757, 1816, 284, 262, 3650, 13, 5335, 2921, 257, 4144, 284]
CORRUPTED = CLEAN[:11] + [1757] + CLEAN[12:]  # the second subject swapped, as the papers' IOI pairs
ANSWER, COUNTERFACTUAL = 1757, 5335


@pytest.fixture(scope="module", params=["ln", "noln"])
def case(request, ln_model, noln_model, ln_dir, noln_dir):
    model, directory = (ln_model, ln_dir) if request.param == "ln" else (noln_model, noln_dir)
    return model, hf_model(directory), request.param == "noln"


def sensitive_pair(model) -> tuple[int, int]:
    """The answer and counterfactual whose logit difference the corruption moves most (a random model is no IOI
    solver; this keeps every map well above float noise)."""
    moved = model.forward(torch.tensor([CLEAN]))[0, -1] - model.forward(torch.tensor([CORRUPTED]))[0, -1]
    return int(moved.argmax()), int(moved.argmin())


@pytest.fixture(scope="module")
def results(case):
    model, hf, ln_free = case
    a, b = sensitive_pair(model)
    return patching(model, CLEAN, CORRUPTED, a, b), attr_vs_act_patching(hf, CLEAN, CORRUPTED, a, b), ln_free


def test_both_patchings_equal_the_papers_script(results):
    got, papers, _ = results
    L = got.resid_act.shape[0] - 1
    assert abs(papers["clean"] - papers["corrupted"]) > 1e-3  # the pair moves the metric
    np.testing.assert_allclose(got.clean_metric, papers["clean"], atol=2e-5)
    np.testing.assert_allclose(got.corrupted_metric, papers["corrupted"], atol=2e-5)
    np.testing.assert_allclose(got.resid_act[:L], papers["act"], atol=5e-5)
    np.testing.assert_allclose(got.resid_attr[:L], papers["attr"], atol=5e-5)
    assert np.abs(papers["act"]).max() > 1e-3 and np.abs(papers["attr"]).max() > 1e-3
    # the papers' normaliser: activation patching at layer 0 where the prompts differ = clean - corrupted
    np.testing.assert_allclose(papers["act"][0, 11], got.normaliser, atol=5e-5)
    np.testing.assert_allclose(got.normalised(got.resid_act)[0, 11], 1.0, atol=1e-4)
    same = [p for p in range(len(CLEAN)) if p != 11]
    assert np.abs(got.resid_act[0, same]).max() < 1e-5 and not got.resid_attr[0, same].any()


def test_attribution_patching_alone_gives_the_same_maps(case, results):
    got = results[0]
    resid, z = attribution_patching(case[0], CLEAN, CORRUPTED, got.answer_id, got.counterfactual_id)
    np.testing.assert_array_equal(resid, got.resid_attr)
    np.testing.assert_array_equal(z, got.z_attr)


def test_the_final_stream_is_exact_without_ln_and_only_there(results):
    got, _, ln_free = results
    act, attr = got.resid_act[-1, -1], got.resid_attr[-1, -1]
    assert abs(act) > 1e-3
    last_block = np.abs(got.resid_act[-2] - got.resid_attr[-2]).max() / np.abs(got.resid_act[-2]).max()
    if ln_free:
        assert abs(attr - act) <= 1e-5 * abs(act) + 1e-7  # the readout is affine
        # the last block is not linear, LN or not: its first-order error stands far above float noise
        assert last_block > 1e-4 and last_block > 100 * abs(attr - act) / abs(act)
    else:
        assert abs(attr - act) > 1e-4 * abs(act)
    assert not got.resid_attr[-1, :-1].any() and np.abs(got.resid_act[-1, :-1]).max() < 1e-5


def test_head_patching_equals_one_unbatched_run_per_head(case, results):
    model, _, _ = case
    got = results[0]
    L, H = model.info.n_layers, model.info.n_heads
    a, b = got.answer_id, got.counterfactual_id
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))
    corrupt_logits = model.forward(torch.tensor([CORRUPTED]))[0, -1]
    base = float(corrupt_logits[a] - corrupt_logits[b])
    for layer, head in [(0, 0), (L - 1, H - 1), (L // 2, 1)]:
        name = f"blocks.{layer}.attn.hook_z"

        def edit(n, value, name=name, head=head):
            if n == name:
                value = value.clone()
                value[:, :, head] = clean_cache[name][:, :, head]
            return value

        logits = model.forward(torch.tensor([CORRUPTED]), edit=edit)[0, -1]
        assert abs(float(logits[a] - logits[b]) - base - got.z_act[layer, head]) < 5e-5
    assert np.abs(got.z_act).max() > 1e-4


def test_head_attribution_is_the_gradient_along_the_difference(case, results):
    """grad . (clean - corrupted) for one head's z, against a finite difference of the metric in float64 terms."""
    model, _, _ = case
    got = results[0]
    layer, head = model.info.n_layers - 1, 0
    name = f"blocks.{layer}.attn.hook_z"
    _, clean_cache = model.run_with_cache(torch.tensor([CLEAN]))
    _, corrupt_cache = model.run_with_cache(torch.tensor([CORRUPTED]))
    diff = clean_cache[name][:, :, head] - corrupt_cache[name][:, :, head]

    def metric(step: float) -> float:
        def edit(n, value):
            if n == name:
                value = value.clone()
                value[:, :, head] += step * diff
            return value
        logits = model.forward(torch.tensor([CORRUPTED]), edit=edit)[0, -1].double()
        return float(logits[got.answer_id] - logits[got.counterfactual_id])

    h = 1e-2
    slope = (metric(h) - metric(-h)) / (2 * h)
    assert abs(slope - got.z_attr[layer, head]) < 2e-3 * max(1.0, abs(slope))


def test_agreement_measures():
    a = np.array([[1.0, 0.0], [2.0, -1.0]])
    same = agreement(a, a)
    assert same.nmae == 0.0 and same.correlation == pytest.approx(1.0)
    off = agreement(a, a * 0.5)
    assert off.nmae == pytest.approx(0.5) and off.correlation == pytest.approx(1.0)
    assert agreement(np.zeros(3), np.zeros(3)).nmae == 0.0


@pytest.mark.parametrize("clean, corrupted, answer, counterfactual, message", [
    (CLEAN, CORRUPTED[:-1], ANSWER, COUNTERFACTUAL, "same token length"),
    (CLEAN, CORRUPTED, ANSWER, ANSWER, "same token"),
    (CLEAN[:1], CORRUPTED[:1], ANSWER, COUNTERFACTUAL, "at least 2 tokens"),
    (CLEAN, CORRUPTED, "", COUNTERFACTUAL, "empty"),
])
def test_bad_requests_are_one_line_errors(ln_model, clean, corrupted, answer, counterfactual, message):
    with pytest.raises(InputError, match=message):
        patching(ln_model, clean, corrupted, answer, counterfactual)


def test_ioi_groups_are_the_papers(ln_model):
    for t, template in enumerate(TEMPLATES):
        prompts, answers = ioi_bisymmetric_group("Mary", "John", template, "store", "drink")
        group = ioi_group(t, "John", "Mary", "store", "drink")  # x = [B] = the subject, y = [A] = IO
        assert [p.clean for p in group] == prompts
        assert [(p.answer, p.counterfactual) for p in group] == answers
        # the corrupted prompt is the pair partner (i + 1 for even i): one token apart, answers swapped
        for i, p in enumerate(group):
            partner = group[i + 1 if i % 2 == 0 else i - 1]
            assert p.corrupted == partner.clean and (p.answer, p.counterfactual) == (partner.counterfactual,
                                                                                    partner.answer)
            a, b = (ln_model.tokenizer.encode(x).ids for x in (p.clean, p.corrupted))
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def test_ioi_pairs_are_seeded_and_the_papers_default(ln_model):
    pairs = ioi_pairs(tokenizer=ln_model.tokenizer)
    assert len(pairs) == 480 and {p.template for p in pairs} == {0}
    assert pairs == ioi_pairs(tokenizer=ln_model.tokenizer) and pairs != ioi_pairs(seed=1, tokenizer=ln_model.tokenizer)
    mixed = ioi_pairs(64, seed=2, templates=len(TEMPLATES))
    assert len({p.template for p in mixed}) > 1
    only = ioi_pairs(8, usable=lambda token_id: token_id in (5335, 1757), tokenizer=ln_model.tokenizer)
    assert {p.answer for p in only} == {" Mary", " John"}
    with pytest.raises(InputError, match="multiple of 4"):
        ioi_pairs(6)
    with pytest.raises(InputError, match="fewer than two"):
        ioi_pairs(4, tokenizer=ln_model.tokenizer, usable=lambda token_id: False)
