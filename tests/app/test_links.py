"""Shareable state: query parameters are validated like widgets, and links round-trip."""

from __future__ import annotations

import pytest

from pages.shell.limits import MAX_TEXT_CHARS
from pages.shell.links import PRESETS, AppState, default_state, parse_query, share_link, to_query, valid_model_spec


def test_round_trip(ln_dir):
    state = AppState(model_a=str(ln_dir), model_b="apollo-research/gpt2_noLN@v2", model_c="schaeff/gpt2-small_vanilla300",
                     text="Hello\tworld", answer=" a", counterfactual=" b", position=3, bos=False, device="cpu",
                     dtype="bfloat16", page="attention")
    assert parse_query(to_query(state)) == state


def test_share_link_is_url_encoded():
    link = share_link(AppState(text="a&b=c #x"), "http://host:8501")
    assert link.startswith("http://host:8501/?model_a=") and "a%26b%3Dc+%23x" in link


@pytest.mark.parametrize("params, note", [
    ({"position": "abc"}, "position"), ({"position": "9" * 30}, "position"), ({"dtype": "float8"}, "dtype"),
    ({"device": "tpu"}, "device"), ({"page": "../etc"}, "page"), ({"bos": "maybe"}, "bos"),
    ({"model_a": "bad id!!"}, "model_a"), ({"model_b": ""}, "model_b"), ({"answer": "x" * 500}, "answer"),
    ({"model_a": "owner/name@bad rev"}, "model_a"),
])
def test_invalid_params_are_ignored_with_a_note(params, note):
    state = parse_query(params)
    assert any(note in n for n in state.notes)
    assert state == default_state()  # defaults kept (notes do not take part in equality)


def test_text_is_limited_and_cleaned():
    state = parse_query({"text": "a\x00b" + "c" * (MAX_TEXT_CHARS + 10)})
    assert len(state.text) == MAX_TEXT_CHARS and "\x00" not in state.text and len(state.notes) == 2


def test_new_text_drops_the_presets_tokens():
    state = parse_query({"text": "Something else"})
    assert state.answer is None and state.counterfactual is None
    assert parse_query({"text": "x", "answer": " y", "counterfactual": " z"}).answer == " y"


def test_lists_take_the_last_value():
    assert parse_query({"position": ["1", "2"]}).position == 2


def test_local_directories_can_be_refused(ln_dir):
    assert valid_model_spec(str(ln_dir)) is None
    assert "disabled" in valid_model_spec(str(ln_dir), allow_local=False)
    state = parse_query({"model_a": str(ln_dir)}, allow_local=False)
    assert state.model_a == default_state().model_a and state.notes


def test_registry_and_hub_ids_are_accepted_without_network():
    for spec in ["openai-community/gpt2", "apollo-research/gpt2_noLN@v3", "someone/model@main", "gpt2"]:
        assert valid_model_spec(spec) is None


def test_default_models_from_the_environment(monkeypatch):
    from pages.shell.links import default_state

    monkeypatch.setenv("NOLN_DEFAULT_MODELS", "a/b, c/d ,e/f")
    state = default_state()
    assert (state.model_a, state.model_b, state.model_c) == ("a/b", "c/d", "e/f")


def test_induction_preset_words_are_single_tokens(ln_model):
    from noln_core import tokenize

    for induction in (p for p in PRESETS if "nduction" in p.name):
        words = induction.text.split()
        assert all(len(tokenize(ln_model, " " + w, prepend_bos=False)) == 1 for w in words)
        assert induction.answer.strip() == words[len(words) // 2]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_tokens_are_single_tokens(ln_model, preset):
    from noln_core import tokenize

    assert len(tokenize(ln_model, preset.answer, prepend_bos=False)) == 1
    assert len(tokenize(ln_model, preset.counterfactual, prepend_bos=False)) == 1
