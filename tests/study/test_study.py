"""A study's numbers against direct recomputations in transformers, on the same sequences."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from noln_core.errors import InputError, TokenizerMismatchError
from noln_core.study import Settings, run_study, text_corpus, to_json
from noln_core.corpus import parse_corpus
from noln_core.study.measure import LOSS_BIN
from noln_core.study.stats import mean_ci

import papers

SEQ, BATCH, TOKENS = 32, 3, 32 * 10


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="module")
def study(ln_model, noln_model, state):
    return run_study([ln_model, noln_model], parse_corpus("demo"), seq_len=SEQ, batch=BATCH, max_tokens=TOKENS,
                     settings=Settings(bootstrap=200), state_dir=state)


def study_chunks(model, corpus, directory, seq_len=SEQ, max_tokens=TOKENS) -> torch.Tensor:
    """The sequences a study of ``corpus`` reads (its chunks, made the same way; the study keeps only its result)."""
    from noln_core.corpus import prepare_chunks

    chunks = prepare_chunks(corpus, model.tokenizer, directory, seq_len, max_tokens=max_tokens)
    return torch.from_numpy(np.asarray(chunks.tokens(), dtype=np.int64))


@pytest.fixture(scope="module")
def reference(ln_dir, noln_dir, ln_model, study, tmp_path_factory):
    """Everything recomputed from transformers' own forward passes on the study's chunks."""
    tokens = study_chunks(ln_model, parse_corpus("demo"), tmp_path_factory.mktemp("chunks"))
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


def test_nmae_equals_the_papers_run_analysis(study, reference, ln_dir, noln_dir):
    """Per head and global, on the same chunks: head outputs without their value biases (fold_value_biases)."""
    for m, name in zip(study.models, ("ln", "noln")):
        capture = papers.hf_capture(reference[name]["hf"], reference["tokens"])
        dla, de = papers.run_analysis_nmae(reference[name]["hf"], capture, reference["tokens"], m.ln_free)
        nmae, per_head = papers.nmae_from(dla, de)
        assert m.nmae_bootstrap == "papers"
        if m.ln_free:
            assert m.nmae.mean < 1e-9 and nmae < 1e-9  # exact without LayerNorm
        else:
            assert nmae > 0.01
            assert m.nmae.mean == pytest.approx(nmae, rel=1e-6)
            np.testing.assert_allclose(m.nmae_per_head.ravel(), per_head, rtol=1e-6)
            np.random.seed(study.settings.seed)  # the papers draw from NumPy's global generator
            _, lo, hi = papers.papers_bootstrap(dla, de, study.settings.bootstrap)
            assert m.nmae.ci95 == pytest.approx((lo / 100, hi / 100), rel=1e-5)
        np.testing.assert_allclose(m.direct_effect_per_head.ravel(), de.mean(1), atol=1e-5)
        np.testing.assert_allclose(m.dla_per_head.ravel(), dla.mean(1), atol=1e-5)


def test_value_biases_change_the_nmae_and_logit_diff_keeps_them_in_the_heads(ln_model, state, reference):
    # The old study counted b_V in each head under the papers' target, and differed from their code.
    capture = papers.hf_capture(reference["ln"]["hf"], reference["tokens"])
    dla, de = papers.run_analysis_nmae(reference["ln"]["hf"], capture, reference["tokens"], False)
    with_bias = run_study([ln_model], parse_corpus("demo"), seq_len=SEQ, batch=BATCH, max_tokens=TOKENS,
                          settings=Settings(bootstrap=0, nmae_target="logit-diff"), state_dir=state)
    assert to_json(with_bias)["models"][0]["nmae"]["value_bias"] == "head"
    assert with_bias.models[0].nmae.mean != pytest.approx(papers.nmae_from(dla, de)[0], rel=1e-3)


def test_first_token_norms_and_sink_rates_equal_the_papers(study, reference):
    for m, name in zip(study.models, ("ln", "noln")):
        hf, tokens = reference[name]["hf"], reference["tokens"]
        capture = papers.hf_capture(hf, tokens)
        norms = papers.residual_norms_first_token(hf, capture, tokens, m.ln_free)  # (samples, hooks)
        assert m.first_token_norm["labels"][:3] == ("embed", "pos_embed", "L0 mid")
        np.testing.assert_allclose(m.first_token_norm["mean"], norms.mean(0), rtol=1e-5)
        # torch's unbiased std, from exact sums of squares: right to about 1e-5 absolute whatever the spread
        np.testing.assert_allclose(m.first_token_norm["std"], norms.std(0, ddof=1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(m.first_token_norm["max"], norms.max(0), rtol=1e-5)
        attn = [a.double() for a in reference[name]["attn"]]
        assert m.sink_rate["papers"].mean == pytest.approx(papers.calculate_sink_rate(attn), abs=1e-9)
        assert m.sink_rate["gu2024"].mean == pytest.approx(papers.compute_attention_sink(attn), abs=1e-9)
        importance = torch.stack(attn, 1)[..., 0].mean(-1).mean(0)  # (L, H): Gu's score of the first token
        np.testing.assert_allclose(m.sink_heads, importance.numpy(), atol=1e-6)


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


def test_exploding_tokens_of_millions_of_nats_make_a_study(exploding_dir, tmp_path):
    """The XL LN-free model's Pile outlier, in small: a study, exact totals, the exploding tokens listed."""
    from checkpoints import EXPLODING_TOKEN, hf_model, ln_free_reference

    from noln_core import load_model

    model = load_model(str(exploding_dir), device="cpu")
    kw = dict(seq_len=SEQ, batch=2, max_tokens=TOKENS, settings=Settings(bootstrap=50))
    whole = run_study([model], parse_corpus("demo"), state_dir=tmp_path / "a", **kw)
    (m,) = whole.models
    tokens = study_chunks(model, parse_corpus("demo"), tmp_path / "chunks")
    with torch.no_grad():
        logits = ln_free_reference(hf_model(exploding_dir))(tokens).logits.double()
    loss = -logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0].numpy()
    assert loss.max() > 5e6 and (loss > 20).sum() <= 12  # a few tokens, millions of nats
    assert m.ce.mean == pytest.approx(loss.mean(), rel=1e-5)
    assert m.ce_median == pytest.approx(np.median(loss), abs=LOSS_BIN)
    assert m.ce_percentiles[99.95] == pytest.approx(np.percentile(loss, 99.95), rel=1e-4)
    assert m.losses_beyond == (loss >= 32).sum()
    listed = {e.token_id: e for e in m.exploding}
    assert EXPLODING_TOKEN in listed and listed[EXPLODING_TOKEN].max_loss > 5e6
    assert m.exploding_positions == (loss > 20).sum()
    # Cancelled and resumed, the same numbers bit for bit.
    asked = iter(range(100))
    run_study([model], parse_corpus("demo"), state_dir=tmp_path / "b", cancel=lambda: next(asked) >= 2, **kw)
    resumed = run_study([model], parse_corpus("demo"), state_dir=tmp_path / "b", **kw)
    assert json.dumps(to_json(resumed)) == json.dumps(to_json(whole))


# --- the disk: compact shards, finished studies as their result alone, writers that never collide ------------------

def test_a_shard_holds_what_it_counted_and_a_finished_study_only_its_result(ln_model, noln_model, exploding_dir,
                                                                           tmp_path):
    """Vocabulary-sized counts and the 320,000-bin loss histogram are stored by their entries: a stopped study of one
    8-token sequence and three models saves kilobytes (it saved 15.6 MB)."""
    from noln_core import load_model

    models = [ln_model, noln_model, load_model(str(exploding_dir), device="cpu")]
    kw = dict(seq_len=8, batch=1, max_tokens=16, settings=Settings(bootstrap=50), state_dir=tmp_path)
    asked = iter(range(10))
    partial = run_study(models, text_corpus("In the beginning God created the heaven and the earth. " * 3),
                        cancel=lambda: next(asked) >= 1, **kw)
    assert not partial.complete and partial.n_sequences == 1
    (shard,) = tmp_path.rglob("shard-*.pt")
    assert shard.stat().st_size < 300_000
    whole = run_study(models, text_corpus("In the beginning God created the heaven and the earth. " * 3), **kw)
    assert whole.complete and [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["result.pt"]
    assert next(tmp_path.rglob("result.pt")).stat().st_size < 300_000
    again = run_study(models, text_corpus("In the beginning God created the heaven and the earth. " * 3), **kw)
    assert json.dumps(to_json(again)) == json.dumps(to_json(whole))  # contexts and all, from the result alone


def test_nothing_ran_nothing_saved_and_each_writer_has_its_own_temporary_file(ln_model, tmp_path, monkeypatch):
    """Cancel's second look at a stopped study runs no batch: it must not write the shard (a running writer's
    state would be overwritten with an older one), and it counts what was done."""
    import noln_core.study.engine as engine

    kw = dict(seq_len=SEQ, batch=2, max_tokens=TOKENS, settings=Settings(bootstrap=0), state_dir=tmp_path)
    asked = iter(range(100))
    first = run_study([ln_model], parse_corpus("demo"), cancel=lambda: next(asked) >= 2, **kw)
    (shard,) = tmp_path.rglob("shard-*.pt")
    before = shard.stat().st_mtime_ns
    saves = []
    real = engine._save
    monkeypatch.setattr(engine, "_save", lambda path, state: saves.append(path) or real(path, state))
    second = run_study([ln_model], parse_corpus("demo"), cancel=lambda: True, **kw)
    assert first.n_sequences == second.n_sequences == 4 and not second.complete
    assert saves == [] and shard.stat().st_mtime_ns == before
    import threading

    names = []
    monkeypatch.setattr(engine.torch, "save", lambda state, path: names.append(Path(path).name) or
                        Path(path).write_bytes(b"x"))
    engine._save(tmp_path / "s.pt", {})
    threading.Thread(target=engine._save, args=(tmp_path / "s.pt", {})).start()
    time.sleep(0.2)
    assert len(set(names)) == 2 and all(n.startswith("s.pt.") and n.endswith(".tmp") for n in names)


def test_prune_cache_deletes_the_least_recently_used_studies_first(tmp_path):
    import os

    from noln_core.study.engine import directory_bytes, prune_cache

    for i, name in enumerate(["old", "running", "mid", "new"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.pt").write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert prune_cache(tmp_path, 2500, keep={"running"}) == ["old", "mid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "running"] and directory_bytes(tmp_path) == 2000
