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


def test_the_shipped_tour_tells_the_story_in_eight_steps():
    assert "ln-free-story" in shipped_tours()
    assert [s.figure for s in SHIPPED.steps] == ["predictions", "first-token-norm", "dla", "dla-vs-direct-effect",
                                                "attention-sinks", "entropy-neurons", "patching", "parting"]
    assert all(s.question.text.strip() and s.notice.text.strip() for s in SHIPPED.steps)
    assert SHIPPED.steps[-1].link_page == "study"
    assert all(s.answer and s.counterfactual for s in SHIPPED.steps if s.figure in ("dla", "dla-vs-direct-effect"))


@pytest.fixture(scope="module")
def runs(ln_model, noln_model):
    return {i: compare([ln_model, noln_model], s.text, s.answer, s.counterfactual, s.position)
            for i, s in enumerate(SHIPPED.steps)}


@pytest.fixture(scope="module")
def findings(ln_model, noln_model):
    """``findings(result)(kind)`` as the app gives it: marked neurons' ablation, patching into the swapped text."""
    from noln_core.corpus import parse_corpus
    from noln_core.findings.neurons import corpus_means, neuron_ablation, neuron_signature
    from noln_core.findings.patching import patching, swapped_prompt

    models = [ln_model, noln_model]

    def of(result):
        def compute(kind):
            if kind == "neurons":
                return [neuron_ablation(m, result.token_ids, neuron_signature(m).marked,
                                        corpus_means(m, parse_corpus("demo"), sequences=20)) for m in models]
            t = result.target
            return [patching(m, result.text, swapped_prompt(result.text, t.answer, t.counterfactual), t.answer,
                             t.counterfactual) for m in models]
        return compute
    return of


def test_facts_are_the_analyses_of_the_live_run(runs, findings):
    facts = {i: step_facts(SHIPPED.steps[i], r, findings=findings(r)) for i, r in runs.items()}
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
    assert facts[5]["via_ln_b"] == 0.0 and facts[5]["via_ln_a"] > 0  # the LN-free model: exactly 0
    assert facts[5]["neurons_a"] and facts[5]["neuron_loss_a"] > 0
    assert facts[6]["final_gap_b"] < 1e-5 < facts[6]["final_gap_a"] and facts[6]["patch_nmae_a"] > 0
    assert facts[7]["max_loss_gap"] == max(nt_pair for nt_pair in next_token(runs[7]).pairs[0].loss_diff)
    assert "via_ln_a" not in step_facts(SHIPPED.steps[5], runs[5])  # without the models: a dash in the text


def test_step_text_carries_the_live_numbers_and_nothing_is_missing(runs, findings):
    for i, step in enumerate(SHIPPED.steps):
        facts = step_facts(step, runs[i], findings=findings(runs[i]))
        notice, weak, question = step_text(step, facts)
        assert "—" not in notice and "{" not in notice, (i, notice)
        for name in FIGURES[step.figure]:
            for key in (name, f"{name}_a", f"{name}_b"):
                if "{" + key + ":" in step.notice.text:
                    spec = step.notice.text.split("{" + key + ":")[1].split("}")[0]
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
    ("title = 'x'\n" + GOOD_STEP.replace("{loss_a:.2f}", "{loss_a:.2f"), "lone '{'"),
])
def test_bad_tour_files_get_one_clear_line(text, message):
    with pytest.raises(TourError, match=None) as err:
        parse_tour(text, "mine")
    assert message in str(err.value) and "\n" not in str(err.value) and "'mine'" in str(err.value)


def test_a_copied_and_edited_tour_loads(tmp_path):
    copy = tmp_path / "my-tour.toml"
    copy.write_text(shipped_tours()["ln-free-story"].read_text().replace("in eight steps", "for my class"))
    tour = load_tour(copy)
    assert tour.name == "my-tour" and tour.title.endswith("for my class") and len(tour.steps) == 8
    with pytest.raises(TourError, match="no tour 'nope'"):
        load_tour("nope")


# --- A tour file from anyone: nothing in it reaches str.format, memory, or past the server's limits ---------------

PROBES = {
    # The probe that printed the server's HF_TOKEN through str.format's attribute and item access:
    "globals": "{zz.__format__.__globals__[Path].exists.__globals__[os].environ[HF_TOKEN]}",
    "session": "{top_a.__class__.__init__.__globals__[Runtime]._instance._session_mgr}",
    "nested spec": "{top_a:{top_a.__format__.__globals__[os].environ[HF_TOKEN][0]}<3}",
    "huge width": "{loss_a:>100000000}",
    "huge precision": "{loss_a:.100000f}",
    "conversion": "{loss_a!a}",
    "index": "{loss_a[0]}",
}


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("field", ["notice", "question", "weak"])
def test_every_template_probe_is_refused_when_the_file_is_parsed(probe, field):
    value = PROBES[probe].replace('"', '\\"')
    step = GOOD_STEP if field == "weak" else GOOD_STEP.replace(
        f'{field} = "{"A {loss_a:.2f} B {loss_b:.2f}" if field == "notice" else "Why?"}"', f'{field} = "{value}"')
    if field == "weak":
        step += f'\n  [[steps.weak]]\n  fact = "loss_a"\n  below = 1\n  text = "{value}"\n'
    with pytest.raises(TourError) as err:
        parse_tour("title = 'x'\n" + step, "mine")
    message = str(err.value)
    assert "'mine', step 1" in message and ("weak text 1" if field == "weak" else field) in message
    assert "\n" not in message and "HF_TOKEN" not in message.split("placeholder")[0]


def test_titles_and_the_introduction_hold_no_placeholders():
    for text, where in (('title = "{loss_a}"\n' + GOOD_STEP, "title"),
                        ('title = "x"\nintroduction = "{loss_a}"\n' + GOOD_STEP, "introduction"),
                        ('title = "x"\n' + GOOD_STEP.replace('title = "One"', 'title = "{loss_a.real}"'),
                         "step 1, title")):
        with pytest.raises(TourError, match=where):
            parse_tour(text, "mine")
    assert parse_tour('title = "braces {{ok}}"\n' + GOOD_STEP, "mine").title == "braces {ok}"


@pytest.mark.parametrize("text, message", [
    ("title = 'x'\n" + GOOD_STEP + "\n  [[steps.weak]]\n  fact = 'loss_a'\n  below = 'x'\n  text = 'w'\n",
     "weak 1's 'below' must be a number"),
    ("title = {a = 1}\n" + GOOD_STEP, "'title' must be a non-empty string"),
    ("title = 'x'\nsteps = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("title = 'x'\n" + GOOD_STEP.replace('text = "Hello there"', 'text = "' + "a" * 30_000 + '"'), "more than the 20,000"),
    ("title = 'x'\n" + GOOD_STEP.replace('text = "Hello there"', 'text = "' + "a" * 300_000 + '"'), "larger than 256 kB"),
    ("title = 'x'\n" + GOOD_STEP + "position = 10000000\n", "'position' must be an integer"),
    ("title = 'x'\n" + GOOD_STEP + "link_page = '../../etc'\n", "'link_page' must be the name of a page"),
])
def test_malformed_values_get_the_tours_own_error(text, message):
    with pytest.raises(TourError, match=None) as err:
        parse_tour(text, "mine")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hosted_limits_apply_to_a_tours_values():
    text = "title = 'x'\nmodels = ['/etc', 'openai-community/gpt2']\n" + GOOD_STEP
    with pytest.raises(TourError, match="model '/etc' cannot be used here: only registry"):
        parse_tour(text, "mine", check_model=lambda s: None if s.startswith("openai") else "only registry models")
    with pytest.raises(TourError, match="more than the 100 this server takes"):
        parse_tour("title = 'x'\n" + GOOD_STEP.replace("Hello there", "x" * 101), "mine", max_text_chars=100)


def test_a_format_that_does_not_fit_the_value_is_the_tours_error():
    tour = parse_tour("title = 'x'\n" + GOOD_STEP.replace("{loss_a:.2f}", "{loss_a:d}"), "mine")
    with pytest.raises(TourError, match=r"step 1: the placeholder \{loss_a:d\} cannot format float"):
        step_text(tour.steps[0], {"loss_a": 1.5}, "step 1")
