"""The Study page runs a small study end to end, equal to the library's; Cancel keeps what was done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from noln_core import load_model
from noln_core.study import Settings, parse_corpus, run_study, to_json

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PAGE = "pages/views/study.py"


@pytest.fixture
def page(ln_dir, noln_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NOLN_STUDY_CACHE", str(tmp_path / "studies"))
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "device": "cpu"})
    at.run()
    at.switch_page(PAGE).run()
    at.text_input(key="w_study_more").set_value(f"{ln_dir}, {noln_dir}")
    at.number_input(key="w_study_seq").set_value(32)
    at.number_input(key="w_study_budget").set_value(32 * 6)
    at.number_input(key="w_study_batch").set_value(3)
    at.run()
    return at


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_page_runs_a_study_equal_to_the_library(page, ln_dir, noln_dir, tmp_path):
    page.button(key="w_study_run").click().run()
    assert_clean(page)
    assert len(page.get("plotly_chart")) >= 6  # CE, position, reliability, NMAE, norms, loss differences
    models = [load_model(str(d), device="cpu", name=d.name) for d in (ln_dir, noln_dir)]
    expected = to_json(run_study(models, parse_corpus("demo"), seq_len=32, batch=3, max_tokens=32 * 6,
                                 settings=Settings(), state_dir=tmp_path / "lib"))
    caption = " ".join(c.value for c in page.caption)
    assert f"{expected['n_sequences']} sequences of 32 tokens" in caption
    frames = [d.value for d in page.dataframe]
    assert any("context" in f.columns for f in frames)
    # The headline numbers on screen are the library's (the CE figure's data).
    fig = json.loads(page.get("plotly_chart")[0].proto.spec)
    assert fig["data"][0]["x"] == pytest.approx([m["ce"]["mean"] for m in expected["models"]])


def test_a_second_visit_reuses_the_finished_study(page, monkeypatch):
    page.button(key="w_study_run").click().run()
    import noln_core.study.measure as measure

    def refuse(*a, **k):
        raise AssertionError("the study ran again")

    monkeypatch.setattr(measure, "measure_batch", refuse)
    monkeypatch.setattr("noln_core.study.engine.measure_batch", refuse)
    page.switch_page("pages/views/overview.py").run()
    page.switch_page(PAGE).run()
    page.button(key="w_study_run").click().run()
    assert_clean(page)
    assert len(page.get("plotly_chart")) >= 6


def test_cancelled_study_shows_what_was_done_and_resumes(page, monkeypatch):
    """Cancel reruns the script; Streamlit stops the running study at its next progress update (StopException
    here, as the script runner raises it), the engine saves, and the rerun shows the part that was done."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    import noln_core.study.engine as engine

    real, calls = engine.measure_batch, []

    def stopped_by_streamlit(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise StopException()
        return real(*a, **k)

    monkeypatch.setattr(engine, "measure_batch", stopped_by_streamlit)
    page.button(key="w_study_run").click().run()
    assert page.button(key="w_study_cancel")  # offered while the study runs
    page.session_state["_study_cancelled"] = page.session_state["_study_request"]  # what Cancel's callback records
    page.run()
    assert_clean(page)
    assert any("Stopped after 3 sequences" in w.value for w in page.warning)
    assert len(calls) == 2  # showing the saved part ran nothing more
    monkeypatch.setattr(engine, "measure_batch", real)
    page.button(key="w_study_run").click().run()
    assert_clean(page)
    assert not page.warning and any("6 sequences of 32 tokens" in c.value for c in page.caption)


def test_bad_corpus_gets_an_error_box_and_keeps_the_inputs(page):
    page.radio(key="w_study_source").set_value("text").run()
    page.text_area(key="w_study_text").set_value("too short").run()
    page.button(key="w_study_run").click().run()
    assert not page.exception
    assert any("fewer than one sequence" in e.value for e in page.error)
    assert page.text_area(key="w_study_text").value == "too short"


def test_hosted_mode_caps_the_budget_and_hides_local_paths(ln_dir, noln_dir, monkeypatch, tmp_path):
    import importlib

    import pages.shell.limits as limits

    monkeypatch.setenv("NOLN_HOSTED", "1")
    monkeypatch.setenv("NOLN_STUDY_MAX_TOKENS", "4096")
    monkeypatch.setenv("NOLN_DEFAULT_MODELS", "demo:gpt2-kjv,demo:gpt2-kjv-noLN")
    importlib.reload(limits)
    try:
        at = AppTest.from_file(APP, default_timeout=240)
        at.run()
        at.switch_page(PAGE).run()
        assert "path" not in at.radio(key="w_study_source").options
        budget = at.number_input(key="w_study_budget")
        assert budget.max == 4096 and budget.value <= 4096
        assert not any(t.key == "w_study_more" for t in at.text_input)
    finally:
        monkeypatch.delenv("NOLN_HOSTED")
        importlib.reload(limits)


def test_one_visitor_running_many_studies_stays_under_the_disk_cap(monkeypatch, tmp_path):
    """Hosted, studies are kept within NOLN_STUDY_CACHE_MB (least recently used first); uploads never touch the
    disk; a finished study keeps its result alone.  The probe wrote 300 MB in 93 s and deleted nothing."""
    import importlib

    import pages.shell.limits as limits
    from noln_core.study.engine import directory_bytes

    root = tmp_path / "studies"
    for name, value in (("NOLN_HOSTED", "1"), ("NOLN_STUDY_CACHE", str(root)), ("NOLN_STUDY_CACHE_MB", "1"),
                        ("NOLN_DEFAULT_MODELS", "demo:gpt2-kjv,demo:gpt2-kjv-noLN")):
        monkeypatch.setenv(name, value)
    importlib.reload(limits)
    try:
        at = AppTest.from_file(APP, default_timeout=240)
        at.run()
        at.switch_page(PAGE).run()
        at.number_input(key="w_study_seq").set_value(32)
        at.number_input(key="w_study_budget").set_value(32 * 3)
        at.radio(key="w_study_source").set_value("text").run()
        sizes = []
        for i in range(8):
            at.text_area(key="w_study_text").set_value(f"Study number {i}. " + "And the evening and the morning "
                                                       "were the first day. " * (10 + i)).run()
            at.button(key="w_study_run").click().run()
            assert_clean(at)
            sizes.append(directory_bytes(root))
            assert sizes[-1] <= 1_000_000, sizes
            assert not [p for p in root.rglob("*") if p.is_file() and p.name != "result.pt"]
        assert len(list(root.iterdir())) < 8  # the oldest went
    finally:
        for name in ("NOLN_HOSTED", "NOLN_STUDY_CACHE_MB", "NOLN_DEFAULT_MODELS"):
            monkeypatch.delenv(name)
        importlib.reload(limits)


def test_an_uploaded_jsonl_never_touches_the_disk_and_its_errors_name_no_server_path(page, tmp_path):
    from noln_core.corpus import Corpus
    from noln_core.errors import InputError
    from noln_core.study import run_study

    corpus = Corpus("jsonl", "notes.jsonl", field="body", text='{"text": "a"}\n')
    with pytest.raises(InputError) as err:
        run_study([load_model(str(Path(page.query_params["model_a"])), device="cpu")], corpus, seq_len=8,
                  state_dir=tmp_path / "s")
    from pages.shell.display import for_page

    shown = for_page(str(err.value), hosted=True)
    assert "'notes.jsonl'" in shown and "--field" not in shown and "field box" in shown
    assert for_page("no dataset 'x' could be read (FileNotFoundError: '/root/.cache/huggingface/x.arrow')",
                    hosted=True) == "no dataset 'x' could be read (FileNotFoundError: 'x.arrow')"


def test_the_form_says_its_limits_in_its_own_words_and_estimates_the_run(ln_dir, noln_dir, tmp_path, monkeypatch):
    """The length defaults to what the models can take, with a note; the budget's minimum is beside it; a budget
    under one sequence gets the page's words, not a CLI flag; Estimate times one batch before Run."""
    monkeypatch.setenv("NOLN_STUDY_CACHE", str(tmp_path / "studies"))
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "device": "cpu"})
    at.run()
    at.switch_page(PAGE).run()
    at.text_input(key="w_study_more").set_value(f"{ln_dir}, {noln_dir}").run()
    assert_clean(at)
    seq = at.number_input(key="w_study_seq")
    assert seq.value == 64 and "at most 64" in seq.label  # the tiny models' context, not the papers' 1024
    assert any("Cut to 64: the shortest context of these models is 64 tokens" in c.value for c in at.caption)
    assert "at least 64" in at.number_input(key="w_study_budget").label
    at.number_input(key="w_study_budget").set_value(64 * 4)
    at.number_input(key="w_study_batch").set_value(2).run()
    at.button(key="w_study_estimate").click().run()
    assert_clean(at)
    said = [c.value for c in at.caption if c.value.startswith("About ")]
    assert len(said) == 1 and "2 batch(es)" in said[0], said
    at.number_input(key="w_study_batch").set_value(4).run()  # settings changed: the old estimate is not shown
    assert any("estimate again" in c.value for c in at.caption)
    at.number_input(key="w_study_seq").set_value(32)
    at.number_input(key="w_study_budget").set_value(16).run()
    at.button(key="w_study_run").click().run()
    shown = " ".join(e.value for e in at.error)
    assert "raise the budget to at least 32" in shown and "--" not in shown


def test_estimate_run_scales_one_timed_batch_to_the_budget(noln_model, ln_model):
    from noln_core.errors import InputError
    from noln_core.study.engine import estimate_run

    e = estimate_run([ln_model, noln_model], 16, 3, 16 * 10, Settings())
    assert e.batches == 4 and e.batch_seconds > 0 and e.seconds == pytest.approx(e.batch_seconds * 4)
    with pytest.raises(InputError, match="holds no sequence"):
        estimate_run([ln_model], 16, 3, 8, Settings())
