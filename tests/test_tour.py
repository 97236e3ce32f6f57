"""Guided tours: the shipped tour is valid, its text is filled from the live run, bad tour files fail clearly."""

from __future__ import annotations

import math

import pytest

from noln_core import compare
from noln_core.analyses import attention, direct_logit_attribution, head_direct_effects, next_token, residual_norms
from noln_core.teaching.tour import FIGURES, TourError, load_tour, parse_tour, render, shipped_tours, step_facts, step_text

SHIPPED = load_tour("ln-free-story")
GOOD_STEP = """
[[steps]]
title = "One"
figure = "predictions"
text = "Hello there"
notice = "A {loss_a:.2f} B {loss_b:.2f}"
question = "Why?"
"""


def test_the_shipped_tour_tells_the_story_in_six_steps():
    assert "ln-free-story" in shipped_tours()
    assert [s.figure for s in SHIPPED.steps] == ["predictions", "first-token-norm", "dla", "dla-vs-direct-effect",
                                                "attention-sinks", "parting"]
    assert all(s.question.strip() and s.notice.strip() for s in SHIPPED.steps)
    assert SHIPPED.steps[-1].link_page == "study"
    assert all(s.answer and s.counterfactual for s in SHIPPED.steps if s.figure in ("dla", "dla-vs-direct-effect"))


@pytest.fixture(scope="module")
def runs(ln_model, noln_model):
    return {i: compare([ln_model, noln_model], s.text, s.answer, s.counterfactual, s.position)
            for i, s in enumerate(SHIPPED.steps)}


def test_facts_are_the_analyses_of_the_live_run(runs):
    facts = {i: step_facts(SHIPPED.steps[i], r) for i, r in runs.items()}
    nt = next_token(runs[0])
    assert facts[0]["loss_a"] == nt.models[0].mean_loss and facts[0]["agreement"] == 100 * nt.pairs[0].agreement
    norms = residual_norms(runs[1])
    assert facts[1]["first_norm_b"] == norms[1].first_token_max
    dla = direct_logit_attribution(runs[2])
    assert facts[2]["constant_b"] == dla[1].constant and facts[2]["logit_diff_a"] == dla[0].logit_diff
    assert facts[2]["dla_error_b"] < 1e-4  # the tour's claim: exact for the LN-free model
    effects = head_direct_effects(runs[3])
    assert facts[3]["nmae_a"] == 100 * effects[0].nmae and facts[3]["nmae_b"] < 1e-6
    sinks = attention(runs[4])
    assert facts[4]["sink_rate_papers_b"] == 100 * sinks[1].sink_rate_papers
    assert facts[5]["max_loss_gap"] == max(nt_pair for nt_pair in next_token(runs[5]).pairs[0].loss_diff)


def test_step_text_carries_the_live_numbers_and_nothing_is_missing(runs):
    for i, step in enumerate(SHIPPED.steps):
        facts = step_facts(step, runs[i])
        notice, weak, question = step_text(step, facts)
        assert "—" not in notice and "{" not in notice, (i, notice)
        for name in FIGURES[step.figure]:
            for key in (name, f"{name}_a", f"{name}_b"):
                if "{" + key + ":" in step.notice:
                    spec = step.notice.split("{" + key + ":")[1].split("}")[0]
                    assert format(facts[key], spec) in notice
        for w in step.weak:
            assert (render(w.text, facts) in weak) == w.holds(facts)


def test_weak_sentences_follow_their_threshold():
    step = SHIPPED.steps[1]
    weak = step.weak[0]
    assert weak.fact == "first_ratio_a" and weak.below == 3
    assert step_text(step, {"first_ratio_a": 1.5})[1] and not step_text(step, {"first_ratio_a": 12.0})[1]
    assert not weak.holds({"first_ratio_a": math.nan})


def test_a_fact_the_run_cannot_give_shows_a_dash():
    assert render("C lost {loss_c:.2f}", {"loss_a": 1.0}) == "C lost —"
    assert render("gap {x:+.1f}", {"x": math.nan}) == "gap —"


@pytest.mark.parametrize("text, message", [
    ("title = 'x'\nsteps = [", "is not valid TOML"),
    (GOOD_STEP, "has no 'title'"),
    ("title = 'x'\nsteps = []", "must be a list"),
    ("title = 'x'\n" + GOOD_STEP.replace('"predictions"', '"heatmap"'), "unknown figure 'heatmap'"),
    ("title = 'x'\n" + GOOD_STEP.replace("{loss_b:.2f}", "{loss_z}"), "uses {loss_z}"),
    ("title = 'x'\n" + GOOD_STEP.replace('"predictions"', '"dla"').replace("loss_a:.2f", "nmae_a"), "needs an 'answer'"),
    ("title = 'x'\n" + GOOD_STEP.replace('title = "One"', 'titel = "One"'), "unknown key 'titel'"),
    ("title = 'x'\n" + GOOD_STEP.replace('question = "Why?"', 'question = ""'), "'question' must be a non-empty"),
    ("title = 'x'\nmodels = ['a']\n" + GOOD_STEP, "'models' must list 2 or 3"),
    ("title = 'x'\n" + GOOD_STEP + "\n  [[steps.weak]]\n  fact = 'nmae_a'\n  below = 1\n  text = 'w'\n",
     "weak fact 'nmae_a'"),
    ("title = 'x'\n" + GOOD_STEP.replace("{loss_a:.2f}", "{loss_a:.2f"), "malformed placeholder"),
])
def test_bad_tour_files_get_one_clear_line(text, message):
    with pytest.raises(TourError, match=None) as err:
        parse_tour(text, "mine")
    assert message in str(err.value) and "\n" not in str(err.value) and "'mine'" in str(err.value)


def test_a_copied_and_edited_tour_loads(tmp_path):
    copy = tmp_path / "my-tour.toml"
    copy.write_text(shipped_tours()["ln-free-story"].read_text().replace("in six steps", "for my class"))
    tour = load_tour(copy)
    assert tour.name == "my-tour" and tour.title.endswith("for my class") and len(tour.steps) == 6
    with pytest.raises(TourError, match="no tour 'nope'"):
        load_tour("nope")
