"""The teaching layer in the app: a notebook of every view, and presentation mode."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nbformat
import pytest
from nbclient import NotebookClient

from test_app import assert_clean, make_app
from pages import PAGES
from pages.shell.display import PRESENTATION_FONT
from pages.shell.links import parse_query, to_query

VIEW_PAGES = [p for p in PAGES if p.name not in ("study", "about")]  # the Tour's is its step's analysis page


def downloads(at) -> dict[str, str]:
    """Download buttons by key: their file names (AppTest exposes them as unknown elements with a proto)."""
    found = {}
    for el in at.get("download_button"):
        found[el.proto.label] = el.proto.url
    return found


@pytest.mark.parametrize("page", VIEW_PAGES, ids=[p.name for p in VIEW_PAGES])
def test_every_view_offers_a_notebook_and_a_script(ln_dir, noln_dir, page):
    at = make_app(ln_dir, noln_dir, page=page.name)
    at.run()
    assert_clean(at)
    assert {"Notebook", "Script"} <= set(downloads(at))


def test_a_tour_steps_notebook_is_its_figures_analysis_page(ln_dir, noln_dir):
    from pages.shell.export import TOUR_VIEWS, current_view
    from pages.shell.links import AppState

    s = AppState(model_a=str(ln_dir), model_b=str(noln_dir), page="tour", tour="ln-free-story", step=4,
                 answer=" Mary", counterfactual=" John")

    class Result:
        position = -1
        runs = [SimpleNamespace(info=SimpleNamespace(n_layers=3))]

    assert current_view(Result(), s, "dla-vs-direct-effect").page == "attribution"
    assert current_view(Result(), s, "first-token-norm").page == "residual-norms"
    assert set(TOUR_VIEWS.values()) <= {"overview", "residual-norms", "attribution", "attention"}


def test_the_apps_notebook_runs_and_shows_the_apps_numbers(ln_dir, noln_dir, tmp_path):
    """The download is built from the session's state; rebuilt from the same state, it runs and shows the metrics."""
    from noln_core import compare, load_model
    from noln_core.notebook import notebook_json
    from pages.shell.export import current_view
    from pages.shell.links import AppState

    at = make_app(ln_dir, noln_dir, page="overview")
    at.run()
    assert_clean(at)
    losses = [float(m.value.split()[0]) for m in at.metric if m.label.startswith("Mean loss")]
    s = parse_query(dict(at.query_params.items()), base=AppState())
    result = compare([load_model(spec, device="cpu", name=spec) for spec in (s.model_a, s.model_b)], s.text,
                     s.answer, s.counterfactual, s.position, prepend_bos=s.bos)
    path = tmp_path / "view.ipynb"
    path.write_text(notebook_json(current_view(result, s)))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    numbers = json.loads(nb.cells[-1].outputs[0]["text"].strip().splitlines()[-1])
    assert [round(x, 3) for x in numbers["mean_loss"]] == losses and len(losses) == 2


def test_presentation_mode_enlarges_figures_and_travels_in_links(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, present="1", page="residual-norms")
    at.run()
    assert_clean(at)
    assert at.query_params["present"] == "1"
    charts = at.get("plotly_chart")
    assert charts and all(json.loads(c.proto.spec)["layout"]["font"]["size"] == PRESENTATION_FONT for c in charts)
    at.sidebar.toggle(key="w_present").set_value(False).run()
    assert "present" not in at.query_params
    charts = at.get("plotly_chart")
    assert all(json.loads(c.proto.spec)["layout"].get("font", {}).get("size") != PRESENTATION_FONT for c in charts)
    assert to_query(parse_query({"present": "1"}))["present"] == "1"
    assert "ignored present" in parse_query({"present": "maybe"}).notes[0]


def test_the_first_notebook_download_holds_the_layer_on_screen(ln_dir, noln_dir, monkeypatch):
    """The export is drawn (sidebar) before the page's slider; the first download must still hold its value."""
    import pages.shell.export as export

    seen = []
    original = export.notebook_json
    monkeypatch.setattr(export, "notebook_json", lambda view: seen.append(view) or original(view))
    at = make_app(ln_dir, noln_dir, page="attribution", answer=" the", counterfactual=" a")
    at.run()
    assert_clean(at)
    shown = at.slider(key="w_attr_layer").value
    assert shown == at.slider(key="w_attr_layer").max > 0  # the last layer, not 0
    assert seen[0].page == "attribution" and seen[0].options["layer"] == shown
    assert f"LAYER = {shown}" in original(seen[0])
    at.slider(key="w_attr_layer").set_value(0).run()
    assert seen[-1].options["layer"] == 0
