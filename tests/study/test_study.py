"""A study's numbers against direct recomputations in transformers, on the same sequences."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from noln_core.errors import InputError, TokenizerMismatchError
from noln_core.study import Settings, run_study, text_corpus, to_json
from noln_core.corpus import parse_corpus
from noln_core.study.measure import LOSS_BIN
from noln_core.study.stats import mean_ci

SEQ, BATCH, TOKENS = 32, 3, 32 * 10


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="module")
def study(ln_model, noln_model, state):
    return run_study([ln_model, noln_model], parse_corpus("demo"), seq_len=SEQ, batch=BATCH, max_tokens=TOKENS,
                     settings=Settings(bootstrap=200), state_dir=state)


@pytest.fixture(scope="module")
def reference(ln_dir, noln_dir, study, state):
    """Everything recomputed from transformers' own forward passes on the study's chunks."""
    key_dirs = [p for p in state.iterdir() if (p / "chunks.json").exists()]
    tokens = torch.from_numpy(np.memmap(key_dirs[0] / "chunks.u32", dtype=np.uint32).astype(np.int64)).view(-1, SEQ)
    out = {"tokens": tokens}
    for name, directory in (("ln", ln_dir), ("noln", noln_dir)):
        hf = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
        final, heads = {}, {}
        hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: final.__setitem__("x", a[0]))
        for layer, block in enumerate(hf.transformer.h):
            block.attn.c_proj.register_forward_pre_hook(lambda m, a, layer=layer: heads.__setitem__(layer, a[0]))
        with torch.no_grad():
            res = hf(tokens, output_attentions=True, output_hidden_states=True)
        out[name] = {"hf": hf, "logits": res.logits.double(), "attn": res.attentions, "hidden": res.hidden_states,
                     "final": final["x"].double(), "heads": heads}
    return out


def hf_losses(ref, name):
    lp = ref[name]["logits"][:, :-1].log_softmax(-1)
    return -lp.gather(-1, ref["tokens"][:, 1:, None])[..., 0]


def test_ce_equals_transformers(study, reference):
    assert study.n_sequences == TOKENS // SEQ == len(reference["tokens"])
    for m, name in zip(study.models, ("ln", "noln")):
        loss = hf_losses(reference, name).numpy()
        per_seq = loss.mean(1)
        mean, ci = mean_ci(len(per_seq), per_seq.sum(), (per_seq**2).sum())
        assert m.ce.mean == pytest.approx(loss.mean(), abs=1e-5)
        assert m.ce.ci95 == pytest.approx(ci, abs=1e-5)  # an interval over sequences, not tokens
        assert abs(m.ce_median - np.median(loss)) <= LOSS_BIN  # per token, not per chunk
        np.testing.assert_allclose(m.loss_by_position, loss.mean(0), atol=1e-5)
        assert m.n_tokens == loss.size and m.loss_histogram.sum() == loss.size


def test_entropy_and_calibration_equal_the_papers_formulas(study, reference):
    for m, name in zip(study.models, ("ln", "noln")):
        logits = reference[name]["logits"][:, :-1]
        p = logits.softmax(-1)
        entropy = -(p * logits.log_softmax(-1)).sum(-1)
        assert m.entropy.mean == pytest.approx(entropy.mean().item(), abs=1e-5)
        conf, top = p.max(-1)
        correct = (top == reference["tokens"][:, 1:]).double().numpy().ravel()
        conf = conf.numpy().ravel()
        edges = np.linspace(0, 1, 11)  # analyse_models.py: np.digitize on equal-width edges, clipped
        bins = np.clip(np.digitize(conf, edges) - 1, 0, 9)
        expected = sum((bins == b).sum() / len(conf) * abs(conf[bins == b].mean() - correct[bins == b].mean())
                       for b in range(10) if (bins == b).any())
        assert m.ece.mean == pytest.approx(expected, abs=1e-6)
        assert m.ece.ci95[0] <= m.ece.mean <= m.ece.ci95[1]
        assert m.reliability["count"].sum() == len(conf)


@torch.no_grad()
def direct_effects(ref, name, model):
    """Per (sequence, head) DLA and direct effect of the last token's centred logit at the last position."""
    hf, x = ref[name]["hf"], ref[name]["final"][:, -1]
    ln_free = model.ln_free
    H = hf.config.n_head
    dh = hf.config.n_embd // H
    W_U = hf.transformer.wte.weight.double()
    w_f, b_f = hf.transformer.ln_f.weight.double(), hf.transformer.ln_f.bias.double()
    eps = hf.config.layer_norm_epsilon
    if ln_free:
        w_f = w_f / math.sqrt(eps)  # the stored x1e6 of the neutralising trick undone: no normalisation at all
    t = ref["tokens"][:, -1]

    def readout(v):
        c = v - v.mean(-1, keepdim=True)
        normed = c if ln_free else c / (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        logits = (normed * w_f + b_f) @ W_U.T
        return logits.gather(-1, t.view(-1, *([1] * (v.ndim - 1))).expand(*v.shape[:-1], 1))[..., 0] - logits.mean(-1)

    heads = []
    for layer in range(hf.config.n_layer):
        z = ref[name]["heads"][layer][:, -1].double().view(-1, H, dh)
        W = hf.transformer.h[layer].attn.c_proj.weight.double().view(H, dh, -1)
        heads.append(torch.einsum("bhk,hkd->bhd", z, W))
    r = torch.cat(heads, 1)  # (seq, L*H, d)
    full = readout(x)
    de = full[:, None] - readout(x[:, None] - r)
    # DLA: each head's centred output over the cached final scale, on the centred unembedding of the token.
    scale = torch.ones(len(x), 1, 1, dtype=x.dtype) if ln_free else (
        (x - x.mean(-1, keepdim=True)).pow(2).mean(-1) + eps).sqrt()[:, None, None]
    u = W_U[t] * w_f - (W_U * w_f).mean(0)
    dla = ((r - r.mean(-1, keepdim=True)) / scale * u[:, None]).sum(-1)
    return dla.numpy(), de.numpy()


def test_nmae_is_the_ratio_of_means_of_direct_recomputations(study, reference, ln_model, noln_model):
    for m, name, model in zip(study.models, ("ln", "noln"), (ln_model, noln_model)):
        dla, de = direct_effects(reference, name, model)
        expected = np.abs(dla - de).mean() / np.abs(de).mean()
        if model.ln_free:
            assert m.nmae.mean < 1e-9 and expected < 1e-9  # exact without LayerNorm
        else:
            assert expected > 0.01
            assert m.nmae.mean == pytest.approx(expected, rel=1e-6)
            assert m.nmae.ci95[0] <= m.nmae.mean <= m.nmae.ci95[1]
            per_head = np.abs(dla - de).mean(0) / np.abs(de).mean(0)
            np.testing.assert_allclose(m.nmae_per_head.ravel(), per_head, rtol=1e-6)
        np.testing.assert_allclose(m.direct_effect_per_head.ravel(), de.mean(0), atol=1e-5)


def test_first_token_norms_and_sink_rates_equal_transformers(study, reference):
    for m, name in zip(study.models, ("ln", "noln")):
        hidden = reference[name]["hidden"]
        norms = [h[:, 0].double().norm(dim=-1) for h in hidden[:-1]] + [reference[name]["final"][:, 0].norm(dim=-1)]
        np.testing.assert_allclose(m.first_token_norm["mean"], [n.mean().item() for n in norms], rtol=1e-5)
        np.testing.assert_allclose(m.first_token_norm["max"], [n.max().item() for n in norms], rtol=1e-5)
        attn = torch.stack(reference[name]["attn"], 1)[..., 0]  # (seq, L, H, query): attention on position 0
        papers = ((attn > 0.3).sum((1, 2, 3)).double() / attn[0].numel()).numpy()  # utils.calculate_sink_rate
        gu = (attn[..., 1:].mean(-1) >= 0.3).double().mean((1, 2)).numpy()
        assert m.sink_rate["papers"].mean == pytest.approx(papers.mean(), abs=1e-9)
        assert m.sink_rate["gu2024"].mean == pytest.approx(gu.mean(), abs=1e-9)
        assert papers.mean() > 0  # query 0 always attends to position 0: the papers' count includes it


def test_pair_divergences_equal_transformers(study, reference):
    (pair,) = study.pairs
    la = reference["ln"]["logits"][:, :-1].log_softmax(-1)
    lb = reference["noln"]["logits"][:, :-1].log_softmax(-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    mix = ((la.exp() + lb.exp()) / 2).log()
    js = 0.5 * ((la.exp() * (la - mix)).sum(-1) + (lb.exp() * (lb - mix)).sum(-1))
    agree = (la.argmax(-1) == lb.argmax(-1)).double()
    for est, ref in ((pair.kl_ab, kl_ab), (pair.kl_ba, kl_ba), (pair.js, js), (pair.top1_agreement, agree)):
        assert est.mean == pytest.approx(ref.mean().item(), abs=1e-5)
    diff = (hf_losses(reference, "noln") - hf_losses(reference, "ln")).numpy()
    assert pair.loss_diff_histogram.sum() == diff.size
    top = pair.parting[0]
    targets = reference["tokens"][:, 1:].numpy()
    assert top.count == (targets == top.token_id).sum()
    assert top.total_abs_diff == pytest.approx(np.abs(diff[targets == top.token_id]).sum(), rel=1e-5)
    by_token = {t: np.abs(diff[targets == t]).sum() for t in np.unique(targets)}
    assert top.token_id == max(by_token, key=by_token.get)  # the token where the two part most


def test_exploding_tokens_are_every_position_over_the_threshold(ln_model, state, reference):
    threshold = 11.0  # low enough that these random tiny models cross it
    result = run_study([ln_model], parse_corpus("demo"), seq_len=SEQ, batch=BATCH, max_tokens=TOKENS,
                       settings=Settings(explode_loss=threshold, explode_norm=1e9, bootstrap=0), state_dir=state)
    loss = hf_losses(reference, "ln").numpy()
    flagged = loss > threshold
    (m,) = result.models
    assert m.exploding_positions == flagged.sum() > 0
    inputs = reference["tokens"][:, :-1].numpy()
    top = m.exploding[0]
    assert top.count == (inputs[flagged] == top.token_id).sum()
    assert top.max_loss == pytest.approx(loss[flagged & (inputs == top.token_id)].max(), abs=1e-5)
    assert top.context.endswith(top.token)


def test_cancel_and_resume_equal_one_uninterrupted_run(ln_model, noln_model, tmp_path):
    kw = dict(seq_len=SEQ, batch=2, max_tokens=TOKENS, settings=Settings(bootstrap=50))
    corpus = parse_corpus("demo")
    whole = run_study([ln_model, noln_model], corpus, state_dir=tmp_path / "a", **kw)
    asked = iter(range(100))
    partial = run_study([ln_model, noln_model], corpus, state_dir=tmp_path / "b", cancel=lambda: next(asked) >= 2, **kw)
    assert not partial.complete and partial.n_sequences == 4
    seen = []
    resumed = run_study([ln_model, noln_model], corpus, state_dir=tmp_path / "b", progress=seen.append, **kw)
    assert resumed.complete and seen[0].resumed_from == 4 and seen[-1].done == seen[-1].total == whole.n_sequences
    assert json.dumps(to_json(resumed)) == json.dumps(to_json(whole))
    # A finished study is answered from its saved totals, without a forward pass.
    again = run_study([ln_model, noln_model], corpus, state_dir=tmp_path / "b", progress=seen.append, **kw)
    assert json.dumps(to_json(again)) == json.dumps(to_json(whole)) and seen[-1].done == whole.n_sequences


def test_keyboard_interrupt_saves_and_marks_the_result_partial(ln_model, tmp_path):
    calls = iter(range(100))

    def interrupt():
        if next(calls) == 1:
            raise KeyboardInterrupt
        return False

    kw = dict(seq_len=SEQ, batch=2, max_tokens=TOKENS, settings=Settings(bootstrap=0), state_dir=tmp_path)
    partial = run_study([ln_model], parse_corpus("demo"), cancel=interrupt, **kw)
    assert not partial.complete and partial.n_sequences == 2
    assert run_study([ln_model], parse_corpus("demo"), **kw).complete


def test_models_with_different_tokenizers_are_refused(ln_model, tmp_path):
    from dataclasses import replace

    from noln_core.tokenizer import gpt2_tokenizer

    class Shifted:
        def encode(self, text, add_special_tokens=False):
            enc = gpt2_tokenizer().encode(text, add_special_tokens=False)
            return type("E", (), {"ids": [i + 1 for i in enc.ids]})()

    other = replace(ln_model, tokenizer=Shifted(), info=replace(ln_model.info, name="other"))
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        run_study([ln_model, other], text_corpus("x " * 100), seq_len=8, state_dir=tmp_path)


def test_sequence_longer_than_the_context_is_refused(ln_model, tmp_path):
    with pytest.raises(InputError, match="exceeds the context"):
        run_study([ln_model], text_corpus("x " * 500), seq_len=ln_model.info.n_ctx + 1, state_dir=tmp_path)
