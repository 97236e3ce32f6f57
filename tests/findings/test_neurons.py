"""Entropy neurons: the signature and the mean ablation against the papers' scripts (tests/papers.py) and against
a real forward pass with the activations replaced; the LN-mediated part is exactly 0 without LN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import hf_model
from noln_core.errors import InputError
from noln_core.findings.neurons import (
    ablation_summary, corpus_means, neuron_ablation, neuron_means, neuron_signature, papers_neurons,
)
from papers import ablate_all_models, svd_comparison

TEXT_IDS = [50256, 464, 3290, 373, 257, 1310, 286, 262, 3797, 13, 383, 3797, 373, 257, 1310]


def _sequences(seed: int = 0, n: int = 6, length: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=(n, length))


@pytest.fixture(scope="module", params=["ln", "noln"])
def case(request, ln_model, noln_model, ln_dir, noln_dir):
    model, directory = (ln_model, ln_dir) if request.param == "ln" else (noln_model, noln_dir)
    return model, hf_model(directory), request.param == "noln"


def test_mean_ablation_equals_the_papers_script_and_its_ln_part_is_exactly_zero_without_ln(case):
    model, hf, ln_free = case
    seqs = _sequences()
    means = neuron_means(model, seqs)
    neurons = [3, 17, 101]
    got = neuron_ablation(model, TEXT_IDS, neurons, means)
    papers = ablate_all_models(hf, seqs.tolist(), TEXT_IDS, neurons, ln_free)
    for r, n in enumerate(neurons):
        assert got.labels[r] == f"neuron {n}"
        want_loss, want_ent = papers[n]["loss_effect"], papers[n]["entropy_effect"]
        assert np.abs(want_loss).max() > 1e-5  # the ablation does something here
        # eps 1e-12 (theirs) against the model's own 1e-5 and log(p + 1e-10) differ far below this
        np.testing.assert_allclose(np.abs(got.loss_total[r]), want_loss, rtol=2e-3, atol=3e-6)
        np.testing.assert_allclose(np.abs(got.entropy_total[r][:-1]), want_ent, rtol=2e-3, atol=3e-6)
    assert got.labels[-1] == "all 3" and got.rows[-1] == tuple(neurons)
    np.testing.assert_allclose(got.loss_total, got.loss_direct + got.loss_via_ln, rtol=0, atol=1e-15)
    if ln_free:
        assert not got.loss_via_ln.any() and not got.entropy_via_ln.any()  # exactly 0, not small
        np.testing.assert_array_equal(got.loss_direct, got.loss_total)
        assert got.scale_change is None
        assert all(s.via_ln_share == 0.0 for s in ablation_summary(got))
    else:
        assert np.abs(got.loss_via_ln).max() > 1e-6 and np.abs(got.entropy_via_ln).max() > 1e-6
        assert np.abs(got.scale_change).max() > 0


def test_total_effect_equals_a_forward_pass_with_the_activations_replaced(case):
    model, _, _ = case
    means = neuron_means(model, _sequences(1))
    neurons = [5, 40]
    got = neuron_ablation(model, TEXT_IDS, neurons, means)
    layer = model.info.n_layers - 1
    ids = torch.tensor([TEXT_IDS])

    def edit(name, value):
        if name == f"blocks.{layer}.mlp.hook_post":
            value = value.clone()
            value[..., neurons] = torch.as_tensor(np.asarray(means.values)[neurons], dtype=value.dtype)
        return value

    clean = torch.log_softmax(model.forward(ids)[0].double(), -1)
    ablated = torch.log_softmax(model.forward(ids, edit=edit)[0].double(), -1)
    targets = ids[0, 1:, None]
    d_loss = (-ablated[:-1].gather(-1, targets) + clean[:-1].gather(-1, targets))[:, 0].numpy()
    d_ent = (-(ablated.exp() * ablated).sum(-1) + (clean.exp() * clean).sum(-1)).numpy()
    np.testing.assert_allclose(got.loss_total[-1], d_loss, atol=2e-5)
    np.testing.assert_allclose(got.entropy_total[-1], d_ent, atol=2e-5)
    assert np.abs(d_loss).max() > 1e-4


def test_the_direct_part_reads_the_ablated_stream_with_the_clean_final_scale(ln_model):
    """Direct = the model's readout of the ablated stream, its final LN's scale frozen at the clean stream's."""
    means = neuron_means(ln_model, _sequences(4))
    neurons = [7, 8]
    got = neuron_ablation(ln_model, TEXT_IDS, neurons, means)
    layer = ln_model.info.n_layers - 1
    _, cache = ln_model.run_with_cache(torch.tensor([TEXT_IDS]))
    x = cache[f"blocks.{layer}.hook_resid_post"][0].double()
    post = cache[f"blocks.{layer}.mlp.hook_post"][0].double()
    shift = (torch.as_tensor(np.asarray(means.values)[neurons]) - post[:, neurons]) @ \
        ln_model.weights.W_out[layer][neurons].double()
    s_clean = cache["ln_final.hook_scale"][0].double()
    x_abl = (x + shift).float()
    targets = torch.tensor(TEXT_IDS[1:])[:, None]

    def loss(logits):
        return -torch.log_softmax(logits.double(), -1)[:-1].gather(-1, targets)[:, 0].numpy()

    clean = loss(ln_model.unembed(x.float()))
    direct = loss(ln_model.unembed(x_abl, scale=s_clean.float()))
    total = loss(ln_model.unembed(x_abl))
    np.testing.assert_allclose(got.loss_direct[-1], direct - clean, atol=2e-5)
    np.testing.assert_allclose(got.loss_total[-1], total - clean, atol=2e-5)
    assert np.abs((total - clean) - (direct - clean)).max() > 1e-5


def test_signature_equals_the_papers_script(case):
    model, hf, ln_free = case
    sig = neuron_signature(model, null_k=5)
    want = svd_comparison(hf, ln_free)
    np.testing.assert_allclose(sig.w_out_norm, want["L2_Wout"], rtol=1e-5)
    np.testing.assert_allclose(sig.logit_var, want["var"], rtol=1e-4)
    np.testing.assert_allclose(sig.ratio, want["ratio"], rtol=1e-4)
    assert list(sig.ranking[:10]) == list(want["top_indices"][:10])
    # the null share against the explicit SVD: the 5 smallest non-trivial singular directions
    U, S = want["U"], want["S"]
    order = np.argsort(S)  # ascending; the first is centring's exact null direction
    assert S[order[0]] < 1e-8 * S.max()
    bottom = U[:, order[1:6]]
    w = hf.transformer.h[-1].mlp.c_proj.weight.detach().double().numpy()
    w = w - w.mean(1, keepdims=True)
    share = ((w @ bottom) ** 2).sum(1) / (w**2).sum(1)
    np.testing.assert_allclose(sig.null_share, share, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(sig.singular_values, np.sort(S)[::-1][:-1] / S.max(), rtol=1e-5, atol=1e-9)
    assert sig.marked == tuple(int(i) for i in sig.ranking[:3]) and sig.marked_source == "signature"


def test_papers_neurons_are_marked_for_gpt2_small_and_medium_shapes(ln_model):
    from dataclasses import replace

    small = replace(ln_model, info=replace(ln_model.info, n_layers=12, d_model=768, d_mlp=3072))
    medium = replace(ln_model, info=replace(ln_model.info, n_layers=24, d_model=1024, d_mlp=4096))
    assert papers_neurons(small) == ("small", (584, 2123, 2870))
    assert papers_neurons(medium) == ("medium", (3144, 1083, 1108))
    assert papers_neurons(ln_model) is None


def test_means_equal_a_recomputation_and_are_cached_on_disk(ln_model, tmp_path):
    from noln_core.corpus import text_corpus

    seqs = _sequences(2, n=3, length=10)
    means = neuron_means(ln_model, seqs, batch=2)
    _, cache = ln_model.run_with_cache(torch.as_tensor(seqs), f"blocks.{ln_model.info.n_layers - 1}.mlp.hook_post")
    want = next(iter(cache.values()))[:, :-1].double().mean((0, 1)).numpy()
    np.testing.assert_allclose(means.values, want, rtol=1e-5, atol=1e-7)  # batches of 2 against 3: float32
    assert means.tokens == 27 and means.sequences == 3

    corpus = text_corpus("And God said, Let there be light: and there was light. " * 40)
    first = corpus_means(ln_model, corpus, seq_len=16, sequences=4, cache_dir=tmp_path)
    (stored,) = tmp_path.glob("neuron-means-*.npz")
    again = corpus_means(ln_model, corpus, seq_len=16, sequences=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.values, again.values)
    assert again.tokens == first.tokens == 4 * 15 and "pasted text" in again.source
    other = corpus_means(ln_model, corpus, seq_len=16, sequences=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("neuron-means-*.npz"))) == 2 and other.tokens == 3 * 15
    stored.write_bytes(b"")  # a broken cache file is recomputed, not trusted
    np.testing.assert_array_equal(corpus_means(ln_model, corpus, seq_len=16, sequences=4, cache_dir=tmp_path).values,
                                  first.values)


@pytest.mark.parametrize("neurons, text, message", [
    ([], TEXT_IDS, "at least one neuron"),
    ([10**6], TEXT_IDS, "does not exist"),
    ([-1], TEXT_IDS, "does not exist"),
    ([3], TEXT_IDS[:1], "at least 2 tokens"),
])
def test_bad_requests_are_one_line_errors(ln_model, neurons, text, message):
    means = neuron_means(ln_model, _sequences(3, n=2, length=8))
    with pytest.raises(InputError, match=message):
        neuron_ablation(ln_model, text, neurons, means)
