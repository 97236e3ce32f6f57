"""``compare --neurons`` and ``patch``: the JSON fields, the summary lines, one-line errors, and a patching study on
2 processes equal to 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import launch_two
from noln_core.cli import main

TEXT = "When Mary and John went to the store, John gave a drink to"
CLEAN = "Then, Mary and John went to the store. Mary gave a drink to"
CORRUPTED = "Then, Mary and John went to the store. John gave a drink to"


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_reports_the_neurons_of_each_model(capsys, ln_dir, noln_dir):
    code, out, err = run(capsys, "compare", "--model", str(ln_dir), "--model", str(noln_dir), "--text", TEXT,
                         "--neurons", "3,17", "--means-sequences", "3", "--json", "--device", "cpu")
    assert code == 0, err
    doc = json.loads(out)
    ln, noln = (m["neurons"] for m in doc["models"])
    n = len(doc["token_ids"])
    for entry in (ln, noln):
        ab = entry["ablation"]
        assert ab["labels"] == ["neuron 3", "neuron 17", "all 2"] and np.shape(ab["loss_total"]) == (3, n - 1)
        assert [x["neuron"] for x in entry["signature"]["neurons"]] == [3, 17]
        assert "held-out" in ab["means_source"] and entry["means_tokens"] > 0
        np.testing.assert_allclose(np.add(ab["loss_direct"], ab["loss_via_ln"]), ab["loss_total"], atol=1e-12)
    assert not np.any(noln["ablation"]["loss_via_ln"]) and noln["ablation"]["scale_change"] is None
    assert np.abs(ln["ablation"]["loss_via_ln"]).max() > 0
    assert all(s["via_ln_share"] == 0 for s in noln["ablation"]["summary"])
    code, out, err = run(capsys, "compare", "--model", str(noln_dir), "--text", TEXT, "--neurons",
                         "--means-sequences", "2", "--device", "cpu")
    assert code == 0, err
    assert out.count("ablating neuron") == 3 and "through the final LN 0.0%" in out


@pytest.mark.parametrize("args, message", [
    (["--neurons", "x,y"], "neurons are numbers such as 584,2123"),
    (["--neurons", "99999"], "does not exist"),
    (["--neurons", "3", "--means-data", "/no/such/corpus.txt"], "no such corpus"),
])
def test_bad_neuron_requests_are_one_line_errors(capsys, ln_dir, args, message):
    code, out, err = run(capsys, "compare", "--model", str(ln_dir), "--text", TEXT, *args, "--means-sequences", "2")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_patch_reports_both_patchings_for_each_model(capsys, ln_dir, noln_dir, tmp_path):
    code, out, err = run(capsys, "patch", "--model", str(ln_dir), "--model", str(noln_dir), "--clean", CLEAN,
                         "--corrupted", CORRUPTED, "--answer", " John", "--counterfactual", " Mary", "--json",
                         "--out", str(tmp_path / "out"))
    assert code == 0, err
    doc = json.loads(out)
    assert json.loads((tmp_path / "out" / "patching.json").read_text()) == doc
    ln, noln = doc["models"]
    assert ln["resid_labels"][-1] == "final" and np.shape(ln["resid_act"]) == (4, len(ln["clean_ids"]))
    assert noln["ln_free"] and abs(noln["resid_attr"][-1][-1] - noln["resid_act"][-1][-1]) <= 1e-5 * abs(
        noln["resid_act"][-1][-1]) + 1e-7
    code, out, _ = run(capsys, "patch", "--model", str(ln_dir), "--clean", CLEAN, "--corrupted", CORRUPTED,
                       "--answer", " John", "--counterfactual", " Mary")
    assert code == 0 and "resid_pre NMAE" in out and "with LayerNorm" in out


@pytest.mark.parametrize("args, message", [
    (["--clean", CLEAN], "patch needs --corrupted, --answer, --counterfactual"),
    (["--clean", CLEAN, "--corrupted", CORRUPTED + " them", "--answer", " John", "--counterfactual", " Mary"],
     "same token length"),
    (["--ioi", "6"], "multiple of 4"),
])
def test_bad_patch_requests_are_one_line_errors(capsys, ln_dir, args, message):
    code, out, err = run(capsys, "patch", "--model", str(ln_dir), *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_the_patching_study_on_two_processes_equals_one(ln_dir, noln_dir, tmp_path):
    args = ["patch", "--model", str(ln_dir), "--model", str(noln_dir), "--ioi", "8", "--seed", "3", "--json",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "noln_core", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    doc = json.loads(one.stdout)
    assert doc["prompts"] == 8 and len(doc["per_prompt"]) == 8 and doc["processes"] == 1
    ln, noln = doc["models"]
    assert noln["final_error"] < 1e-5 < 1e-4 < ln["final_error"]
    assert ln["resid_nmae"]["n"] == 8 and np.shape(ln["mean_act"]) == (4, len(doc["tokens"]))
    assert "| model |" in (tmp_path / "one" / "patching.md").read_text()
    two = launch_two(*args)
    assert two.returncode == 0, two.stderr[-2000:]
    doc2 = json.loads(two.stdout)
    assert doc2["processes"] == 2
    doc2["processes"] = 1
    assert doc2 == doc
