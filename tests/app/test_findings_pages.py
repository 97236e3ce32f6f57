"""The Entropy neurons and Patching pages show noln_core's numbers, keep what the user typed, and explain bad input
in an error box."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from noln_core import load_model
from noln_core.corpus import parse_corpus
from noln_core.findings.neurons import ablation_summary, corpus_means, neuron_ablation, neuron_signature
from noln_core.findings.patching import patching, swapped_prompt
from pages.shell.display import md
from pages.shell.links import PRESETS

APP = str(Path(__file__).resolve().parents[2] / "app.py")
TEXT, ANSWER, COUNTERFACTUAL = PRESETS[0].text, PRESETS[0].answer, PRESETS[0].counterfactual


def make_app(ln_dir, noln_dir, page: str, **params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "device": "cpu", "page": page,
                            **params})
    return at


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture(scope="module")
def models(ln_dir, noln_dir):
    return [load_model(str(d), device="cpu", name=d.name) for d in (ln_dir, noln_dir)]


def test_the_neurons_page_shows_the_split_the_library_computes(ln_dir, noln_dir, models):
    at = make_app(ln_dir, noln_dir, "neurons", neurons="3,17")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert at.text_input(key="w_neurons").value == "3,17"
    shown = metrics(at)
    ids = [50256] + models[0].tokenizer.encode(TEXT).ids
    for m in models:
        means = corpus_means(m, parse_corpus("demo"), sequences=250)
        share = ablation_summary(neuron_ablation(m, ids, (3, 17), means))[-1].via_ln_share
        assert shown[f"{md(m.info.name)}: through the final LN"] == f"{share:.1%}"
    assert shown[f"{md(models[1].info.name)}: through the final LN"] == "0.0%"
    assert float(shown[f"{md(models[0].info.name)}: through the final LN"].rstrip("%")) > 0
    assert any("Exactly 0" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 2
    # the default: each model's marked neurons (the top three by signature for these shapes)
    at.text_input(key="w_neurons").set_value("marked").run()
    assert not at.error and "neurons" not in at.query_params
    marked = neuron_signature(models[0]).marked
    assert any(f"neuron {marked[0]}" in option for o in at.radio for option in o.options)
    # bad input: an error box, and the text stays as typed
    at.text_input(key="w_neurons").set_value("584, x").run()
    assert at.error and "neurons are numbers" in at.error[0].value and not at.exception
    assert at.text_input(key="w_neurons").value == "584, x"
    at.text_input(key="w_neurons").set_value("999999").run()
    assert at.error and "does not exist" in at.error[0].value


def test_the_patching_page_shows_both_patchings_and_keeps_a_typed_prompt(ln_dir, noln_dir, models):
    at = make_app(ln_dir, noln_dir, "patching")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    corrupted = swapped_prompt(TEXT, ANSWER, COUNTERFACTUAL)
    assert at.text_input(key="w_corrupted").value == corrupted
    shown = metrics(at)
    for m in models:
        r = patching(m, TEXT, corrupted, ANSWER, COUNTERFACTUAL)
        assert shown[f"{md(m.info.name)}: NMAE over layer × position"] == f"{r.resid_agreement.nmae:.1%}"
    assert len(at.get("plotly_chart")) == 3
    assert any("equal: the LN-free readout is linear" in c.value for c in at.caption)
    # a prompt of another token length: an error box, the typed prompt kept and in the link
    longer = corrupted + " again"
    at.text_input(key="w_corrupted").set_value(longer).run()
    assert at.error and "same token length" in at.error[0].value and not at.exception
    assert at.text_input(key="w_corrupted").value == longer and at.query_params["corrupted"] in (longer, [longer])


def test_the_ioi_button_loads_a_pair_of_the_papers_template(ln_dir, noln_dir):
    at = make_app(ln_dir, noln_dir, "patching")
    at.run()
    at.button(key="w_ioi_example").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = at.query_params["text"]
    text = text[0] if isinstance(text, list) else text
    assert text.startswith("Then, ") and " went to the " in text and text.endswith(" to")
    assert at.text_input(key="w_corrupted").value != text and len(at.get("plotly_chart")) == 3


def test_the_study_pages_benchmarks_run_the_harness_on_a_local_task(ln_dir, noln_dir, tmp_path):
    """The Benchmarks section: a task folder of one's own (local mode), the harness's numbers in a table, and a bad
    folder in an error box with the typed path kept."""
    import json as json_

    import lm_eval

    from noln_core.study.benchmark import run_benchmark

    rows = [{"activity_label": "Cooking", "ctx_a": "A man stirs a pot.", "ctx_b": "he", "ctx": "A man stirs a pot. he",
             "label": str(i % 4), "endings": ["adds salt.", "walks away from the stove.", "sings.", "eats it all."]}
            for i in range(4)]
    (tmp_path / "tiny.jsonl").write_text("".join(json_.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    harness = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tasks / "tiny_hs.yaml").write_text(f"include: {harness}\ntask: tiny_hs\ndataset_path: json\ndataset_name: null\n"
                                        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'tiny.jsonl'}\n"
                                        "training_split: null\n")
    at = make_app(ln_dir, noln_dir, "study")
    at.run()
    at.toggle(key="w_bench_on").set_value(True).run()
    at.text_input(key="w_bench_include").set_value("/no/such/folder").run()
    assert at.error and "not a folder" in at.error[0].value and not at.exception
    assert at.text_input(key="w_bench_include").value == "/no/such/folder"
    at.text_input(key="w_bench_include").set_value(str(tasks)).run()
    at.multiselect(key="w_bench_tasks").set_value(["tiny_hs"]).run()
    at.button(key="w_bench_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (frame,) = [d.value for d in at.dataframe if "metric" in d.value.columns]
    want = run_benchmark([load_model(str(d), device="cpu", name=d.name) for d in (ln_dir, noln_dir)], ["tiny_hs"],
                         include=str(tasks))
    for row in want.rows:
        for name, score in zip(want.models, row.scores):
            shown = frame[(frame.metric == row.metric) & (frame.model == name)]["value"].tolist()
            assert shown == [score.value]
