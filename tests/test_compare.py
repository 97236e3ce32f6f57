"""The side-by-side run: one tokenisation, clear input errors, immutable results, thread safety."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from checkpoints import random_gpt2, save
from helpers import PROMPTS, hf_tokenizer
from noln_core import InputError, TokenizerMismatchError, compare, load_model, tokenize
from noln_core.tokenizer import token_pieces

TEXTS = PROMPTS + [
    "<|endoftext|> special inside text",
    "  leading spaces and trailing  ",
    "Ünïcödé — “quotes” 日本語 العربية",
    "x",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_equals_gpt2s(ln_model, ln_dir, text):
    """The tokenizer built from the shipped BPE files is GPT-2's: same ids as transformers' GPT2TokenizerFast."""
    assert tokenize(ln_model, text, prepend_bos=False) == hf_tokenizer(str(ln_dir))(text)["input_ids"]
    assert tokenize(ln_model, text)[0] == 50256


def test_tokens_and_pieces(ln_model, noln_model):
    result = compare([ln_model, noln_model], "Hello world")
    assert list(result.token_ids) == [50256, 15496, 995]
    assert result.tokens == ("<|endoftext|>", "Hello", " world")
    assert result.pieces == ("<|endoftext|>", "Hello", "Ġworld")
    assert token_pieces(ln_model.tokenizer, [995]) == ((" world",), ("Ġworld",))


def test_no_bos(ln_model):
    result = compare(ln_model, "Hello world", prepend_bos=False)
    assert list(result.token_ids) == [15496, 995] and not result.prepend_bos
    assert result.runs[0].next_logprobs.shape == (1,)


def test_result_is_immutable(ln_model, noln_model):
    result = compare([ln_model, noln_model], PROMPTS[0], " Mary", " John")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.position = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        result.runs[0].entropy[0] = 1.0
    with pytest.raises(ValueError):
        result.runs[1].attribution.components[0, 0] = 1.0
    assert all(isinstance(a, np.ndarray) for a in (result.token_ids, result.runs[0].resid_pre_norm))


def test_empty_text(ln_model):
    with pytest.raises(InputError, match="empty"):
        compare(ln_model, "")


@pytest.mark.parametrize("position", [99, -99, 1.5, True])
def test_bad_position(ln_model, position):
    with pytest.raises(InputError, match="position"):
        compare(ln_model, "Hello world", position=position)


def test_negative_position_counts_from_the_end(ln_model):
    assert compare(ln_model, "Hello world", position=-2).position == 1
    assert compare(ln_model, "Hello world", position=0).position == 0


def test_long_text_is_truncated_with_a_warning(ln_model, noln_model):
    text = " word" * 200
    result = compare([ln_model, noln_model], text, " word", " the")
    assert result.truncated and result.n_tokens == ln_model.info.n_ctx
    assert any("only the first 64" in w for w in result.warnings)
    assert result.runs[0].attribution is not None


def test_multi_token_answer_uses_the_first_with_a_warning(ln_model):
    result = compare(ln_model, PROMPTS[0], " Maryanne Smithsonian", " John")
    assert result.target.answer_id == tokenize(ln_model, " Maryanne", prepend_bos=False)[0]
    assert len(result.target.answer_pieces) > 1
    assert any("is 3 tokens" in w or "tokens [" in w for w in result.warnings)


def test_answer_equal_to_counterfactual_is_flagged(noln_model):
    result = compare(noln_model, PROMPTS[0], " Mary", " Mary")
    assert any("same token" in w for w in result.warnings)
    assert result.runs[0].attribution.logit_diff == 0.0


def test_answer_given_without_counterfactual_warns(ln_model):
    result = compare(ln_model, PROMPTS[0], " Mary", None)
    assert result.target is None and any("both" in w for w in result.warnings)


@pytest.mark.parametrize("token", ["", -1, 10**9])
def test_bad_answer_tokens(ln_model, token):
    with pytest.raises(InputError):
        compare(ln_model, PROMPTS[0], token, " John")


def test_answer_by_token_id(ln_model):
    result = compare(ln_model, PROMPTS[0], 5335, 1757)
    assert (result.target.answer_id, result.target.answer) == (5335, " Mary")


def test_models_with_different_tokenizers_are_refused(tmp_path, ln_model):
    other = load_model(str(save(random_gpt2(seed=4, vocab_size=50260), tmp_path / "other")), device="cpu")
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        compare([ln_model, other], "Hello")


def test_models_that_tokenise_differently_are_refused(tmp_path, ln_model):
    directory = save(random_gpt2(seed=4), tmp_path / "merges")
    merges = (directory / "merges.txt").read_text().splitlines()
    (directory / "merges.txt").write_text("\n".join(m for m in merges if m != "Ġ w") + "\n")
    other = load_model(str(directory), device="cpu")
    with pytest.raises(TokenizerMismatchError, match="tokenise this text differently"):
        compare([ln_model, other], "Hello world")


def test_full_patterns_are_kept_only_within_budget(ln_model):
    assert compare(ln_model, "Hello world").runs[0].attn_patterns is not None
    assert compare(ln_model, "Hello world", max_pattern_elements=10).runs[0].attn_patterns is None


def _summary(result):
    out = []
    for run in result.runs:
        att = run.attribution
        out += [run.next_logprobs, run.resid_pre_norm, run.attn_to_first, att.components, att.head_source, att.neurons]
    return out


def test_concurrent_runs_equal_sequential(ln_model, noln_model):
    """8 threads analyse different texts on the same loaded models; each equals its sequential run."""
    models = [ln_model, noln_model]
    jobs = [(PROMPTS[i % len(PROMPTS)] + " extra" * i, " the", " a") for i in range(16)]
    sequential = [_summary(compare(models, *job)) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda job: _summary(compare(models, *job)), jobs))
    for seq, con in zip(sequential, concurrent):
        for a, b in zip(seq, con):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_every_array_of_a_run_owns_exactly_its_memory(ln_model, noln_model):
    """What a cache counts (``nbytes``) is what a run keeps alive: no array is a view into a larger tensor."""
    import torch

    from noln_core.compare import head_pattern

    def arrays(obj):
        if isinstance(obj, np.ndarray):
            yield obj
        elif isinstance(obj, (tuple, list)):
            for v in obj:
                yield from arrays(v)
        elif hasattr(obj, "__dataclass_fields__"):
            for name in obj.__dataclass_fields__:
                yield from arrays(getattr(obj, name))

    result = compare([ln_model, noln_model], PROMPTS[0], " Mary", " John")
    found = list(arrays(result)) + [head_pattern(ln_model, result.token_ids, 1, 2)]
    assert len(found) > 20
    for arr in found:
        base = arr.base
        held = base.untyped_storage().nbytes() if isinstance(base, torch.Tensor) else (base.nbytes if base is not None else arr.nbytes)
        assert held == arr.nbytes and not arr.flags.writeable
