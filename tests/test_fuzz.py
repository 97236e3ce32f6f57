"""Property tests (Hypothesis): no crash, no unexplained error, and the invariants hold on any input."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noln_core import InputError, compare, direct_logit_attribution, head_direct_effects, tokenize
from noln_core.analyses import exactness_tolerance
from noln_core.tokenizer import token_pieces
from pages import PAGE_NAMES as PAGES
from pages.shell.links import DEVICES, DTYPES, AppState, parse_query, to_query

# Any Unicode, weighted towards what breaks text handling: controls, RTL, zero-width, emoji, markup.
TRICKY = st.sampled_from(["\t", "\x0c", "\n", "\r", "\u200b", "\u200f", "\u202e", "🙂", "👩‍👩‍👧", "<script>", "**",
                          "$x$", "<|endoftext|>", "\\", "\x00", " "])
TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=6), TRICKY), max_size=12).map("".join)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(text=TEXT, position=st.integers(-80, 80), bos=st.booleans(), answer=st.one_of(TEXT, st.integers(-5, 60000)))
def test_compare_never_fails_unexplained_and_ln_free_dla_stays_exact(ln_model, noln_model, text, position, bos, answer):
    try:
        result = compare([ln_model, noln_model], text, answer, " the", position, bos)
    except InputError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert result.n_tokens >= 1 and 0 <= result.position < result.n_tokens
    for run in result.runs:
        assert np.all(np.isfinite(run.next_logprobs)) and np.all(np.isfinite(run.resid_pre_norm))
    if result.target is not None:
        dla = direct_logit_attribution(result)[1]
        assert dla.error <= exactness_tolerance(dla.logit_diff)
        assert head_direct_effects(result)[1].nmae < 1e-4 or math.isclose(
            float(np.abs(head_direct_effects(result)[1].direct_effect).sum()), 0.0, abs_tol=1e-9)


@SETTINGS
@given(text=TEXT)
def test_tokenisation_inspector_is_lossless(ln_model, text):
    ids = tokenize(ln_model, text, prepend_bos=False)
    assert ln_model.tokenizer.decode(ids, skip_special_tokens=False) == text
    decoded, pieces = token_pieces(ln_model.tokenizer, ids)
    assert len(decoded) == len(pieces) == len(ids) and all(isinstance(p, str) and p for p in pieces)


PARAM_KEYS = ["model_a", "model_b", "model_c", "text", "answer", "counterfactual", "position", "bos", "device", "dtype",
              "page", "unknown"]


@SETTINGS
@given(params=st.dictionaries(st.sampled_from(PARAM_KEYS), st.one_of(TEXT, st.lists(TEXT, max_size=3)), max_size=8))
def test_query_param_parser_accepts_anything_and_returns_a_valid_state(params):
    state = parse_query(params, allow_local=False)
    assert isinstance(state, AppState)
    assert state.device in DEVICES and state.dtype in DTYPES and state.page in PAGES
    assert isinstance(state.position, int) and isinstance(state.bos, bool)
    assert state.text and "\x00" not in state.text
    assert all(isinstance(n, str) and "\n" not in n for n in state.notes)
    assert parse_query(to_query(state), allow_local=False) == state
