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
                assert shown[f"Sink rate (Gu et al.) · {label}"] == f"{s.sink_rate:.1%}"
                assert shown[f"Sink rate (Baroni et al. code) · {label}"] == f"{s.sink_rate_papers:.1%}"
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
    """A cache hit runs no model: once each page has been seen, switching pages and toggles calls no forward pass.

    The Attention page runs each model up to the chosen layer once per head it shows (runs keep no full patterns);
    that pattern is cached with the run too."""
    from noln_core.model import LoadedModel

    for page in PAGES:
        app.switch_page(page).run()
    calls = []
    original = LoadedModel.forward
    monkeypatch.setattr(LoadedModel, "forward", lambda self, *a, **k: calls.append(k.get("stop_at_layer")) or original(self, *a, **k))
    for page in PAGES:
        app.switch_page(page).run()
    app.switch_page("pages/views/residual_norms.py").run()
    app.toggle(key="w_norms_first").set_value(False).run()
    assert_clean(app)
    assert calls == []
    app.switch_page("pages/views/attention.py").run()
    app.number_input(key="w_attn_layer").set_value(2).run()
    assert calls == [3, 3]  # one partial pass per model, up to the layer shown
    app.switch_page("pages/views/overview.py").run()
    app.switch_page("pages/views/attention.py").run()
    assert calls == [3, 3] and app.number_input(key="w_attn_layer").value == 2
    assert_clean(app)


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
    """Streamlit's pre-navigation mode runs ``pages/*.py`` on its own; each there is a shim that runs app.py.

    AppTest enters that mode on every run (as a fresh server does for its first request), so each switch here
    goes through it, and must still end on the full app with the page asked for.
    """
    from streamlit.runtime.pages_manager import PagesManager

    root = Path(APP).parent
    shims = {p.stem for p in (root / "pages").glob("*.py")} - {"__init__"}
    assert shims == {spec.name for spec in PAGE_SPECS[1:]}  # test_layout checks that each only runs app.py
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


def _count_forwards(monkeypatch) -> list:
    from noln_core.model import LoadedModel

    calls = []
    original = LoadedModel.forward
    monkeypatch.setattr(LoadedModel, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_editing_the_text_runs_each_model_once(ln_dir, noln_dir, monkeypatch):
    """New text has no answer yet: the run picks it (model A's top prediction) and fills the pickers, in one pass."""
    at = make_app(ln_dir, noln_dir)
    at.run()
    calls = _count_forwards(monkeypatch)
    at.sidebar.text_area(key="w_text").set_value("An edited text that no other test runs").run()
    assert_clean(at)
    assert len(calls) == 2
    result = at.session_state["_run"][1]
    assert result.target.chosen_by_run and at.query_params["answer"] == result.target.answer
    assert at.sidebar.selectbox(key="w_answer").value == result.target.answer
    assert result.target.answer == result.runs[0].top_tokens[0]
    at.run()  # the rerun with the chosen target finds the same run
    assert len(calls) == 2


def test_picking_another_answer_reruns_once_with_it(ln_dir, noln_dir, monkeypatch):
    at = make_app(ln_dir, noln_dir, text="Picking answers from the pickers", answer=" the", counterfactual=" a")
    at.run()
    calls = _count_forwards(monkeypatch)
    options = at.sidebar.selectbox(key="w_answer").options
    other = next(o for o in options if o not in ("' the'", "' a'") and not o.startswith("Other"))
    at.sidebar.selectbox(key="w_answer").set_value(eval(other)).run()  # options are shown as repr()
    assert_clean(at)
    assert len(calls) == 2 and at.session_state["_run"][1].target.answer == eval(other)
    assert at.query_params["answer"] == eval(other)


def test_page_widgets_are_in_the_link(ln_dir, noln_dir):
    """The attribution layer, attention layer and head and the norms toggle come back from a link and go into it."""
    at = make_app(ln_dir, noln_dir, attr_layer="1", attn_layer="2", attn_head="3", norms_first="0", page="attention")
    at.run()
    assert_clean(at)
    assert at.number_input(key="w_attn_layer").value == 2 and at.number_input(key="w_attn_head").value == 3
    at.number_input(key="w_attn_head").set_value(1).run()
    assert at.query_params["attn_head"] == "1"
    at.switch_page("pages/views/attribution.py").run()
    assert at.slider(key="w_attr_layer").value == 1
    at.slider(key="w_attr_layer").set_value(0).run()
    assert at.query_params["attr_layer"] == "0"
    at.radio(key="w_attr_vbias").set_value("b_O").run()  # the papers' value-bias convention, said on the page
    assert at.query_params["attr_vbias"] == "b_O"
    assert any("fold_value_biases" in c.value for c in at.caption)
    at.switch_page("pages/views/residual_norms.py").run()
    assert at.toggle(key="w_norms_first").value is False
    at.toggle(key="w_norms_first").set_value(True).run()
    assert at.query_params["norms_first"] == "1" and at.query_params["page"] == "residual-norms"
    assert_clean(at)


def test_a_link_to_a_layer_beyond_the_model_is_clamped(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, attr_layer="40", attn_layer="99", page="attribution")
    at.run()
    assert_clean(at)
    assert at.slider(key="w_attr_layer").value == 2  # the tiny models have 3 layers


def test_the_same_model_twice_with_one_name_is_shown_apart(ln_dir, noln_dir):
    """A and C the same model with LN: one display name, two columns, no clash on any page."""
    at = make_app(ln_dir, noln_dir, model_c=str(ln_dir))
    at.run()
    for spec in PAGE_SPECS:
        at.switch_page(spec.script).run()
        assert_clean(at)
    at.switch_page("pages/views/residual_norms.py").run()
    shown = metrics(at)
    assert {k for k in shown if k.startswith("Max first-token norm")} == {
        f"Max first-token norm · {label}" for label in labels([ln_dir.name, noln_dir.name, ln_dir.name])}


def test_three_models_name_each_pair_by_its_letters(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, model_c=str(ln_dir))
    at.run()
    assert_clean(at)
    agreements = sorted(k for k in metrics(at) if k.startswith("Top-1 agreement"))
    assert agreements == ["Top-1 agreement · A vs B", "Top-1 agreement · A vs C", "Top-1 agreement · B vs C"]
    legend = [t["name"] for t in json.loads(at.get("plotly_chart")[1].proto.spec)["data"]]
    assert {"KL(A‖B)", "KL(C‖A)", "JS(B, C)"} <= set(legend) and not [n for n in legend if "[" in n]


def test_attribution_caption_shows_the_analysis_method(ln_dir, noln_dir):
    """In bfloat16 the LN-free model's error passes float32's tolerance; the caption still says how it was computed."""
    at = make_app(ln_dir, noln_dir, dtype="bfloat16", page="attribution")
    at.run()
    assert_clean(at)
    result = at.session_state["_run"][1]
    methods = [d.method for d in direct_logit_attribution(result)]
    captions = " ".join(c.value for c in at.caption)
    assert all(md(m) in captions or m in captions for m in methods)
    assert "Cached final-LN scale" not in captions


def test_uploads_take_utf8_text_and_refuse_anything_else_with_the_text_kept(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, text="my typed words")
    at.run()
    uploader = at.sidebar.get("file_uploader")[0]
    uploader.set_value(("latin1.txt", "café".encode("latin-1"), "text/plain")).run()
    assert not at.exception
    assert any("'latin1.txt' is not UTF-8 text (byte 0xe9 at offset 3" in e.value.replace("\\", "") for e in at.error)
    assert at.sidebar.text_area(key="w_text").value == "my typed words"
    at.sidebar.get("file_uploader")[0].set_value(("ok.txt", "Uploaded text, ünïcode".encode(), "text/plain")).run()
    assert_clean(at)
    assert at.sidebar.text_area(key="w_text").value == "Uploaded text, ünïcode"
    assert at.session_state["_run"][1].text == "Uploaded text, ünïcode"


@pytest.mark.parametrize("change", [{"n_layer": 0}, {"n_head": 0}, {"layer_norm_epsilon": "abc"}, {"n_layer": 10**9}])
def test_degenerate_configs_give_an_error_box_and_keep_the_text(ln_dir, tmp_path, change):
    import shutil

    from checkpoints import write_config

    target = tmp_path / "broken"
    shutil.copytree(ln_dir, target)
    write_config(target, **change)
    at = make_app(ln_dir, target, text="my precious words")
    at.run()
    assert not at.exception
    assert any("config.json" in e.value.replace("\\", "") and "unexpected" not in e.value for e in at.error)
    assert at.sidebar.text_area(key="w_text").value == "my precious words"


def test_token_pickers_offer_to_type_a_token(app):
    options = app.sidebar.selectbox(key="w_answer").options
    assert options[-1] == "Other (type a token)…" and not [o for o in options if "repo id" in o]
