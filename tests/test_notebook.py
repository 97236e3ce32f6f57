""""Open this view in Python": the notebook and script run, offline, and show the numbers the CLI and app show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from noln_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = "When Mary and John went to the store, John gave a drink to"


def cli_json(capsys, models) -> dict:
    args = ["compare", "--text", TEXT, "--answer", " Mary", "--counterfactual", " John", "--json", "--device", "cpu"]
    assert main([*args, *[x for m in models for x in ("--model", m)]]) == 0
    return json.loads(capsys.readouterr().out)


def run_notebook(path: Path) -> dict:
    """Run a downloaded notebook where it lies (outside the checkout, as a user would), in a real kernel."""
    assert ROOT not in path.resolve().parents and "PYTHONPATH" not in os.environ
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return json.loads(nb.cells[-1].outputs[0]["text"].strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models(ln_dir, noln_dir):
    return [str(ln_dir), str(noln_dir)]


@pytest.mark.parametrize("page", ["overview", "attribution"])
def test_cli_notebook_runs_and_equals_compare_json(tmp_path, capsys, models, page):
    out = tmp_path / f"{page}.ipynb"
    args = ["notebook", "--text", TEXT, "--answer", " Mary", "--counterfactual", " John", "--page", page,
            "--out", str(out), *[x for m in models for x in ("--model", m)]]
    assert main(args) == 0
    capsys.readouterr()
    numbers = run_notebook(out)
    doc = cli_json(capsys, models)
    if page == "overview":
        assert numbers["mean_loss"] == pytest.approx([m["mean_loss"] for m in doc["models"]], abs=1e-6)
        assert numbers["agreement"] == pytest.approx([p["agreement"] for p in doc["pairs"]])
    else:
        assert numbers["logit_diff"] == pytest.approx([m["logit_diff"] for m in doc["models"]], abs=1e-6)
        assert numbers["dla_constant"] == pytest.approx([m["dla"]["constant"] for m in doc["models"]], abs=1e-6)
        assert numbers["direct_effect_nmae"] == pytest.approx([m["direct_effect_nmae"] for m in doc["models"]],
                                                             abs=1e-6)
        assert numbers["dla_error"][1] < 1e-4  # LN-free: exact


def test_neurons_and_patching_notebooks_equal_the_cli(tmp_path, capsys, models):
    """The two findings pages' notebooks print what ``compare --neurons --json`` and ``patch --json`` print."""
    common = ["--text", TEXT, "--answer", " Mary", "--counterfactual", " John",
              *[x for m in models for x in ("--model", m)]]
    numbers = {}
    for page in ("neurons", "patching"):
        out = tmp_path / f"{page}.ipynb"
        assert main(["notebook", *common, "--page", page, "--neurons", "3,17", "--out", str(out)]) == 0
        capsys.readouterr()
        numbers[page] = run_notebook(out)
    assert main(["compare", "--text", TEXT, "--neurons", "3,17", "--json", "--device", "cpu",
                 *[x for m in models for x in ("--model", m)]]) == 0
    doc = json.loads(capsys.readouterr().out)
    for i, m in enumerate(doc["models"]):
        ab = m["neurons"]["ablation"]
        assert numbers["neurons"]["neurons"][i] == ab["neurons"] == [3, 17]
        assert np.allclose(numbers["neurons"]["loss_total"][i], ab["loss_total"], atol=1e-9)
        assert np.allclose(numbers["neurons"]["loss_via_ln"][i], ab["loss_via_ln"], atol=1e-9)
        assert numbers["neurons"]["via_ln_share"][i] == pytest.approx([x["via_ln_share"] for x in ab["summary"]])
    assert not np.any(numbers["neurons"]["loss_via_ln"][1])  # LN-free: exactly 0
    assert main(["patch", "--clean", TEXT, "--corrupted", "When John and Mary went to the store, Mary gave a drink to",
                 "--answer", " Mary", "--counterfactual", " John", "--json", *[x for m in models for x in ("--model", m)]]) == 0
    patched = json.loads(capsys.readouterr().out)["models"]
    for i, p in enumerate(patched):
        assert np.allclose(numbers["patching"]["resid_act"][i], p["resid_act"], atol=1e-6)
        assert np.allclose(numbers["patching"]["resid_attr"][i], p["resid_attr"], atol=1e-6)
        assert numbers["patching"]["normaliser"][i] == pytest.approx(p["normaliser"], abs=1e-6)


def test_script_runs_offline_on_the_demo_models_and_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "view.py"
    assert main(["notebook", "--model", "demo:gpt2-kjv", "--model", "demo:gpt2-kjv-noLN", "--text", TEXT,
                 "--page", "residual-norms", "--out", str(out)]) == 0
    proc = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    capsys.readouterr()
    doc = cli_json(capsys, ["demo:gpt2-kjv", "demo:gpt2-kjv-noLN"])
    assert np.allclose(numbers["resid_norms"][1], doc["models"][1]["resid_norms"], rtol=1e-5)
    assert np.allclose(numbers["resid_norms"][0], doc["models"][0]["resid_norms"], rtol=1e-5)
    assert list(tmp_path.glob("residual-norms-figure-*.html"))


@pytest.mark.parametrize("args, message", [
    (["--out", "x.txt"], "must end in .ipynb"),
    (["--page", "attribution"], "needs an answer and a counterfactual"),
    (["--out", "/nope/x.ipynb"], "no directory"),
])
def test_notebook_cli_errors_are_one_line(capsys, tmp_path, args, message):
    base = {"--text": TEXT, "--out": str(tmp_path / "n.ipynb")}
    base.update(dict(zip(args[::2], args[1::2])))
    code = main(["notebook", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_the_script_keeps_the_users_text_as_typed():
    """Only the page's analysis template has its .show() calls rewritten; the text is a literal the script never
    touches (the probe's text with .show() was changed, and with a quote the script did not parse)."""
    import ast

    from noln_core.notebook import View, view_notebook, view_script

    text = 'It said "x.show()" and it\'s odd:\n  fig.show() \\ done.show()'
    for page in ("overview", "attribution", "attention"):
        view = View(models=("demo:gpt2-kjv", "demo:gpt2-kjv-noLN"), text=text, answer=" the", counterfactual=" a",
                    page=page)
        script = view_script(view)
        tree = ast.parse(script)  # it parses
        values = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                  if isinstance(t, ast.Name)}
        assert ast.literal_eval(values["TEXT"]) == text
        assert f"{page}-figure-1.html" in script and ".show()" not in script.replace(repr(text), "")
        cells = "".join(c["source"] for c in view_notebook(view)["cells"])
        assert repr(text) in cells


def test_the_install_cell_installs_only_when_needed_and_names_no_server_path(monkeypatch, tmp_path):
    """The first code cell: pip-installs noln_core from install_source() when the kernel lacks it."""
    import importlib.util

    from noln_core.notebook import PACKAGE, View, install_source, view_notebook

    for name in ("NOLN_INSTALL_SOURCE", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert install_source() == str(ROOT)  # locally: this checkout, on the user's own disk
    assert install_source(hosted=True) == PACKAGE  # a hosted server never names one of its paths
    monkeypatch.setenv("SPACE_ID", "someone/noln-explorer")
    assert install_source(hosted=True) == f"{PACKAGE} @ git+https://huggingface.co/spaces/someone/noln-explorer"
    cell = view_notebook(View(models=("demo:gpt2-kjv",), text="x", install="/src/noln"))["cells"][1]["source"]
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    exec(cell, {})  # noln_core is importable here: nothing to do
    assert calls == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    exec(cell, {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "/src/noln"]]
