"""The Tour page: a link opens a step, back and next keep the state, the student's edits stay."""

from __future__ import annotations

from noln_core.teaching.tour import load_tour
from test_app import assert_clean, make_app

TOUR = load_tour("ln-free-story")


def subheaders(at) -> list[str]:
    return [h.value for h in at.subheader]


def test_a_link_opens_step_4_with_its_text_and_figure(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, page="tour", tour="ln-free-story", step="4")
    at.run()
    assert_clean(at)
    step = TOUR.steps[3]
    assert step.title in subheaders(at) and at.header[0].value == TOUR.title
    assert at.query_params["text"] == step.text and at.query_params["answer"] == step.answer
    assert at.query_params["tour"] == "ln-free-story" and at.query_params["step"] == "4"
    assert len(at.get("plotly_chart")) == 1
    notice = next(m.value for m in at.markdown if m.value.startswith("**What to notice.**"))
    assert "{" not in notice and "%" in notice
    assert any(m.value.startswith("**Your turn.**") for m in at.markdown)


def test_next_and_back_keep_the_state_and_the_link(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, page="tour", tour="ln-free-story", step="4", dtype="float32", bos="1")
    at.run()
    at.button(key="tour_next").click().run()
    assert_clean(at)
    assert TOUR.steps[4].title in subheaders(at)
    assert at.query_params["step"] == "5" and at.query_params["text"] == TOUR.steps[4].text
    assert at.query_params["model_a"] == str(ln_dir) and at.query_params["bos"] == "1"
    at.button(key="tour_back").click().run()
    assert TOUR.steps[3].title in subheaders(at) and at.query_params["step"] == "4"
    assert at.button(key="tour_back").disabled is False
    for _ in range(3):
        at.button(key="tour_back").click().run()
    assert at.query_params["step"] == "1" and at.button(key="tour_back").disabled


def test_the_student_may_change_the_text_and_the_step_does_not_take_it_back(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, page="tour", tour="ln-free-story", step="1")
    at.run()
    at.sidebar.text_area(key="w_text").set_value("My own sentence about the light").run()
    assert_clean(at)
    assert at.query_params["text"] == "My own sentence about the light"
    assert TOUR.steps[0].title in subheaders(at)


def test_an_unknown_tour_in_a_link_is_explained(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, page="tour", tour="nope", step="2")
    at.run()
    assert not at.exception
    assert any("ignored tour 'nope'" in w.value for w in [*at.warning, *at.info, *at.caption])
    assert at.query_params["tour"] == "ln-free-story"


def test_opening_the_tour_from_the_menu_keeps_the_text_until_start_and_restore_brings_it_back(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, text="My own text about Mary and John")
    at.run()
    at.switch_page("pages/views/tour.py").run()
    assert_clean(at)
    assert at.query_params["text"] == "My own text about Mary and John"  # nothing replaced yet
    at.button(key="tour_start").click().run()
    assert at.query_params["text"] == TOUR.steps[0].text
    at.button(key="tour_next").click().run()
    assert at.query_params["text"] == TOUR.steps[1].text
    at.sidebar.button(key="tour_restore").click().run()
    assert_clean(at)
    assert at.query_params["text"] == "My own text about Mary and John"
