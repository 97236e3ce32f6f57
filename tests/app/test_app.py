"""AppTest drives every page on tiny checkpoints; values shown equal noln_core's, and no exception appears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from helpers import PROMPTS
from noln_core import (
    attention, compare, direct_logit_attribution, head_direct_effects, load_model, logit_difference, next_token,
    residual_norms,
)

from noln_core.viz.tables import model_labels
from pages import PAGES as PAGE_SPECS
from pages.shell.display import md

APP = str(Path(__file__).resolve().parents[2] / "app.py")
PAGES = [p.script for p in PAGE_SPECS]


def labels(names) -> list[str]:
    """How the pages label models in metrics: ``A: name``, Markdown-escaped."""
    return [md(label) for label in model_labels(names)]


def make_app(ln_dir, noln_dir, **params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "device": "cpu", **params})
    return at


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(scope="module")
def expected(ln_dir, noln_dir):
    models = [load_model(str(ln_dir), device="cpu", name=ln_dir.name), load_model(str(noln_dir), device="cpu", name=noln_dir.name)]
    return compare(models, PROMPTS[0], " Mary", " John")


@pytest.fixture(scope="module")
def app(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir)
    at.run()
    return at


def test_overview_shows_the_library_values(app, expected):
    assert_clean(app)
    nt = next_token(expected)
    shown = metrics(app)
    for label, m in zip(labels(m.name for m in nt.models), nt.models):
        assert shown[f"Mean loss · {label}"] == f"{m.mean_loss:.3f} nats"
    pair = nt.pairs[0]
    assert shown["Top-1 agreement · A vs B"] == f"{pair.agreement:.1%}"
    assert len(app.get("plotly_chart")) == 2


def test_every_page_renders_without_exception(app, expected):
    dla = direct_logit_attribution(expected)
    de = head_direct_effects(expected)
    lens = logit_difference(expected)
    norms = residual_norms(expected)
    sinks = attention(expected)
    for page in PAGES:
        app.switch_page(page).run()
        assert_clean(app)
        shown = metrics(app)
        if page.endswith("logit_difference.py"):
            for m in lens.models:
                assert shown[f"{m.name} ({'LN-free' if m.ln_free else 'with LN'})"] == f"{m.value:+.4f}"
        if page.endswith("attribution.py"):
            for label, d, e in zip(labels(d.name for d in dla), dla, de):
                assert shown[f"{label}: components + constant"] == f"{d.values.sum() + d.constant:+.5f}"
                assert any(f"NMAE {e.nmae:.2%}" in c.value and d.method in c.value for c in app.caption)
            assert abs(dla[1].values.sum() + dla[1].constant - dla[1].logit_diff) <= 1e-4
            assert len(app.get("plotly_chart")) == 4
        if page.endswith("residual_norms.py"):
            for label, m in zip(labels(m.name for m in norms), norms):
                assert shown[f"Max first-token norm · {label}"] == f"{m.first_token_max:,.1f}"
        if page.endswith("attention.py"):
            for label, s in zip(labels(s.name for s in sinks), sinks):
                assert shown[f"Sink rate · {label}"] == f"{s.sink_rate:.1%}"
        if page.endswith("about.py"):
            assert any("2409.13710" in m.value for m in app.markdown) and any("2507.02559" in m.value for m in app.markdown)


def test_query_params_mirror_the_view(app, ln_dir):
    app.switch_page("pages/views/attribution.py").run()
    params = app.query_params
    assert params["model_a"] == str(ln_dir) and params["answer"] == " Mary" and params["page"] == "attribution"
    assert params["text"] == PROMPTS[0] and params["position"] == "-1"


def test_a_link_restores_the_view(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, text=PROMPTS[1], answer=" Paris", counterfactual=" London", position="5",
                  page="logit-difference", bos="1")
    at.run()
    assert_clean(at)
    assert at.query_params["page"] == "logit-difference"
    assert at.sidebar.text_area(key="w_text").value == PROMPTS[1]
    assert at.sidebar.selectbox(key="w_answer").value == " Paris"
    assert at.sidebar.selectbox(key="w_position").value == 5
    expected = compare([load_model(str(ln_dir), device="cpu"), load_model(str(noln_dir), device="cpu")],
                       PROMPTS[1], " Paris", " London", position=5)
    value = logit_difference(expected).models[0].value
    assert f"{value:+.4f}" in metrics(at).values()


def test_bad_model_gives_an_error_box_and_keeps_the_text(ln_dir, tmp_path):
    at = make_app(ln_dir, tmp_path, text="my precious words")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    at.run()
    assert not at.exception
    assert any("llama" in e.value for e in at.error)
    assert at.sidebar.text_area(key="w_text").value == "my precious words"


def test_invalid_link_parameters_are_explained(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, position="abc", dtype="float8", model_c="bad id!!")
    at.run()
    assert_clean(at)
    notes = " ".join(w.value for w in at.warning)
    assert "position" in notes and "dtype" in notes and "model\\_c" in notes  # shown with Markdown escaped


def test_long_text_is_truncated_with_a_notice(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, text=" word" * 200)
    at.run()
    assert_clean(at)
    assert any("only the first 64" in w.value for w in at.warning)


def test_multi_token_answer_and_identical_tokens_are_flagged(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, text=PROMPTS[0], answer=" Maryanne Smithsonian", counterfactual=" Maryanne Smithsonian")
    at.run()
    assert_clean(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "' Maryanne Smithsonian' is" in warnings and "first token" in warnings and "same token" in warnings


def test_empty_text_gives_an_error_box(app):
    app.sidebar.text_area(key="w_text").set_value("").run()
    assert not app.exception and any("empty" in e.value for e in app.error)
    app.sidebar.text_area(key="w_text").set_value(PROMPTS[0]).run()
    assert_clean(app)


def test_presets_fill_text_and_tokens(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir)
    at.run()
    at.sidebar.selectbox(key="w_preset").set_value("Factual recall").run()
    assert_clean(at)
    assert at.sidebar.text_area(key="w_text").value.startswith("The Eiffel Tower")
    assert at.query_params["answer"] == " Paris" and at.query_params["counterfactual"] == " London"


def test_third_model_defaults_to_nothing_and_can_be_added(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, model_c=str(ln_dir))
    at.run()
    assert_clean(at)
    assert len([m for m in at.metric if m.label.startswith("Mean loss")]) == 3


def test_switching_pages_reuses_the_run(app, monkeypatch):
    """A cache hit does not call any model: switching pages and toggles reruns nothing."""
    from noln_core.model import LoadedModel

    app.switch_page("pages/views/overview.py").run()
    calls = []
    original = LoadedModel.forward
    monkeypatch.setattr(LoadedModel, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for page in PAGES:
        app.switch_page(page).run()
    app.switch_page("pages/views/residual_norms.py").run()
    app.toggle(key="w_norms_first").set_value(False).run()
    assert_clean(app)
    assert calls == []


def test_manifest_describes_the_run(app, expected):
    from pages.shell.export import manifest as build_manifest

    manifest = build_manifest(expected, "http://localhost/?x=1")
    assert manifest["token_ids"] == [int(i) for i in expected.token_ids]
    assert [m["ln_free"] for m in manifest["models"]] == [False, True]
    assert manifest["noln_core_version"] and manifest["torch_version"] and manifest["link"] == "http://localhost/?x=1"
    assert any(b.label == "Run manifest (JSON)" for b in app.sidebar.get("download_button"))


def test_tokenisation_inspector_lists_every_token(app, expected):
    frames = [df.value for df in app.sidebar.dataframe]
    inspector = next(f for f in frames if "piece" in f.columns)
    assert list(inspector["id"]) == [int(i) for i in expected.token_ids]
    assert list(inspector["piece"]) == list(expected.pieces)


def test_pages_need_no_legacy_runner_workaround(ln_dir, noln_dir):
    """Streamlit's pre-navigation mode runs ``pages/*.py`` on its own; with none there, it falls back to app.py.

    AppTest enters that mode on every run (as a fresh server does for its first request), so each switch here
    goes through it, and must still end on the full app with the page asked for.
    """
    from streamlit.runtime.pages_manager import PagesManager

    root = Path(APP).parent
    assert [p.name for p in (root / "pages").glob("*.py")] == ["__init__.py"]
    at = make_app(ln_dir, noln_dir)
    at.run()
    for spec in PAGE_SPECS[::-1]:
        at.switch_page(spec.script).run()
        assert PagesManager.uses_pages_directory is False  # app.py's st.navigation took over within the run
        assert_clean(at)
        assert at.query_params["page"] == spec.name
        assert at.sidebar.text_area(key="w_text").value == PROMPTS[0]
    assert [h.value for h in at.header] == ["Overview: what each model predicts"]


def test_a_link_with_tokens_runs_each_model_once(ln_dir, noln_dir, monkeypatch):
    """The pickers reuse the run that has the link's tokens: one forward pass per model, not two."""
    from noln_core.model import LoadedModel

    calls = []
    original = LoadedModel.forward
    monkeypatch.setattr(LoadedModel, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    at = make_app(ln_dir, noln_dir, text="A text no other test uses, run once.", answer=" the", counterfactual=" a")
    at.run()
    assert_clean(at)
    assert len(calls) == 2
