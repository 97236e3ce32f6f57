"""The JSON CLI: its schema, values equal to noln_core's, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from checkpoints import write_config
from helpers import PROMPTS
from noln_core import compare, direct_logit_attribution, head_direct_effects, residual_norms
from noln_core.cli import main


def run_cli(capsys, *args):
    code = main(["compare", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def doc(capsys, ln_dir, noln_dir):
    code, out, err = run_cli(capsys, "--model", str(ln_dir), "--model", str(noln_dir), "--text", PROMPTS[0],
                             "--answer", " Mary", "--counterfactual", " John", "--device", "cpu", "--json")
    assert code == 0 and err == ""
    return json.loads(out)


def test_schema(doc):
    n = len(doc["token_ids"])
    assert doc["tokens"][0] == "<|endoftext|>" and len(doc["tokens"]) == n
    assert len(doc["models"]) == 2
    for m in doc["models"]:
        assert {"source", "revision", "ln_free", "next_token_logprobs", "logit_diff", "dla", "dla_heads",
                "direct_effect_nmae", "resid_norms", "sink_rate"} <= set(m)
        assert len(m["next_token_logprobs"]) == n - 1
        assert set(m["dla"]) >= {"labels", "values", "constant", "error", "value_bias"}
        assert m["dla"]["value_bias"] == "head" and "counted in the head" in m["dla"]["value_bias_definition"]
        assert len(m["dla_heads"]) == 3 and len(m["dla_heads"][0]) == 4
        assert len(m["resid_norms"]) == 3 + 1 and len(m["resid_norms"][0]) == n
    assert [m["ln_free"] for m in doc["models"]] == [False, True]
    assert doc["pairs"][0]["a"] == 0 and doc["pairs"][0]["b"] == 1


def test_values_equal_the_library(doc, ln_model, noln_model):
    result = compare([ln_model, noln_model], PROMPTS[0], " Mary", " John")
    dla, de, norms = direct_logit_attribution(result), head_direct_effects(result), residual_norms(result)
    for i, m in enumerate(doc["models"]):
        np.testing.assert_allclose(m["next_token_logprobs"], result.runs[i].next_logprobs, rtol=1e-6)
        assert m["logit_diff"] == pytest.approx(dla[i].logit_diff)
        np.testing.assert_allclose(m["dla"]["values"], dla[i].values)
        assert m["dla"]["constant"] == pytest.approx(dla[i].constant)
        np.testing.assert_allclose(m["dla_heads"], dla[i].heads)
        assert m["direct_effect_nmae"] == pytest.approx(de[i].nmae)
        np.testing.assert_allclose(m["resid_norms"], norms[i].hidden, rtol=1e-6)
    ln_free = doc["models"][1]
    assert abs(sum(ln_free["dla"]["values"]) + ln_free["dla"]["constant"] - ln_free["logit_diff"]) <= 1e-4


def test_value_bias_convention_of_the_papers(capsys, ln_dir, noln_dir, ln_model, noln_model):
    code, out, _ = run_cli(capsys, "--model", str(ln_dir), "--model", str(noln_dir), "--text", PROMPTS[0],
                           "--answer", " Mary", "--counterfactual", " John", "--device", "cpu", "--json",
                           "--value-bias", "b_O")
    result = compare([ln_model, noln_model], PROMPTS[0], " Mary", " John")
    dla, de = direct_logit_attribution(result, "b_O"), head_direct_effects(result, "b_O")
    for i, m in enumerate(json.loads(out)["models"]):
        assert m["dla"]["value_bias"] == "b_O" and "fold_value_biases" in m["dla"]["value_bias_definition"]
        np.testing.assert_allclose(m["dla_heads"], dla[i].heads)
        assert m["direct_effect_nmae"] == pytest.approx(de[i].nmae)


def test_without_answer_logit_diff_is_null(capsys, ln_dir):
    code, out, _ = run_cli(capsys, "--model", str(ln_dir), "--text", "Hello there", "--json")
    m = json.loads(out)["models"][0]
    assert code == 0 and m["logit_diff"] is None and m["dla"] is None and m["direct_effect_nmae"] is None
    assert m["sink_rate"] is not None


def test_summary_without_json(capsys, ln_dir, noln_dir):
    code, out, _ = run_cli(capsys, "--model", str(ln_dir), "--model", str(noln_dir), "--text", PROMPTS[0],
                           "--answer", " Mary", "--counterfactual", " John")
    assert code == 0 and "LN-free" in out and "exact" in out and "NMAE" in out


def test_text_from_stdin(monkeypatch, capsys, ln_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Hello from stdin ü".encode())))
    code, out, _ = run_cli(capsys, "--model", str(ln_dir), "--text", "-", "--json")
    assert code == 0 and json.loads(out)["text"] == "Hello from stdin ü"


def test_undecodable_stdin_gets_one_line_and_status_2(ln_dir):
    """The probe's case, as a user's shell runs it: bytes that are not UTF-8 piped in."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "noln_core", "compare", "--model", str(ln_dir), "--text", "-"],
                          input=b"\xff\xfe", capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    assert err.count("\n") == 1 and err.startswith("error: the text on stdin is not UTF-8 text (byte 0xff")


@pytest.mark.parametrize("device", ["meta", "xla", "cuda:99"])
def test_devices_that_cannot_run_get_one_line(capsys, ln_dir, device):
    code, _, err = run_cli(capsys, "--model", str(ln_dir), "--text", "hi", "--device", device)
    assert code == 2 and err.count("\n") == 1 and "unexpected" not in err
    assert "cannot run these models" in err or "no CUDA GPU" in err or "CUDA GPU(s)" in err


@pytest.mark.parametrize("change", [{"n_layer": 0}, {"n_layer": -1}, {"n_head": 0}, {"layer_norm_epsilon": "abc"},
                                    {"n_layer": 1_000_000_000}])
def test_degenerate_configs_exit_2_with_one_line(capsys, tmp_path, ln_dir, change):
    import shutil

    from checkpoints import write_config

    target = tmp_path / "bad"
    shutil.copytree(ln_dir, target)
    write_config(target, **change)
    code, _, err = run_cli(capsys, "--model", str(target), "--text", "hi")
    assert code == 2 and err.count("\n") == 1 and "unexpected" not in err and "config.json" in err


def test_long_text_warns_and_truncates(capsys, ln_dir):
    code, out, err = run_cli(capsys, "--model", str(ln_dir), "--text", "word " * 100, "--json")
    assert code == 0 and err.startswith("warning: the text is") and json.loads(out)["truncated"]
    assert len(json.loads(out)["token_ids"]) == 64


def test_multi_token_answer_warns(capsys, ln_dir):
    code, out, err = run_cli(capsys, "--model", str(ln_dir), "--text", PROMPTS[0], "--answer", " Maryanne Smithsonian",
                             "--counterfactual", " John", "--json")
    assert code == 0 and "warning: the answer ' Maryanne Smithsonian' is" in err and "first token" in err


@pytest.mark.parametrize("args, message", [
    (["--text", ""], "error: the text is empty"),
    (["--text", "hi", "--model", "/no/such/dir"], "error: no directory '/no/such/dir'"),
    (["--text", "hi", "--model", "not a repo!"], "error: 'not a repo!' is neither a local directory nor a valid hub repo id"),
    (["--text", "hi", "--model", "someone/unknown-model"], "error: cannot reach the Hugging Face hub and someone/unknown-model is not cached"),
    (["--text", "hi", "--position", "50"], "error: position 50 is outside"),
])
def test_bad_input_exits_nonzero_with_one_line(capsys, ln_dir, args, message):
    if "--model" not in args:
        args = args + ["--model", str(ln_dir)]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_not_gpt2_one_line(capsys, tmp_path, ln_dir):
    target = tmp_path / "bert"
    shutil.copytree(ln_dir, target)
    write_config(target, model_type="bert")
    code, _, err = run_cli(capsys, "--model", str(target), "--text", "hi")
    assert code == 2 and "'bert' model" in err and err.count("\n") == 1


def test_help_and_models_listing():
    help_text = subprocess.run([sys.executable, "-m", "noln_core", "compare", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--json" in help_text.stdout and "SRC[@REV]" in help_text.stdout
    listing = subprocess.run([sys.executable, "-m", "noln_core", "models"], capture_output=True, text=True)
    assert listing.returncode == 0
    assert "apollo-research/gpt2_noLN@v4" in listing.stdout and "schaeff/gpt2-xl_LNFree800" in listing.stdout


def test_module_entry_point_prints_json(ln_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "noln_core", "compare", "--model", str(ln_dir), "--text", "Hi", "--json"],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["token_ids"] == [50256, 17250]


# --- nothing the user had is overwritten -------------------------------------------------------------------------

def command(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_notebook_out_refuses_a_directory_and_an_existing_file(capsys, tmp_path):
    (tmp_path / "mine.ipynb").write_text("my own notebook")
    for out, message in ((tmp_path, "is a directory"), (tmp_path / "mine.ipynb", "exists: choose another name")):
        code, stdout, err = command(capsys, "notebook", "--model", "demo:gpt2-kjv", "--text", "Hello",
                                    "--out", str(out))
        assert code == 2 and message in err and err.count("\n") == 1 and stdout == ""
    assert (tmp_path / "mine.ipynb").read_text() == "my own notebook"
    code, _, _ = command(capsys, "notebook", "--model", "demo:gpt2-kjv", "--text", "Hello", "--out",
                         str(tmp_path / "mine.ipynb"), "--overwrite")
    assert code == 0 and "nbformat" in (tmp_path / "mine.ipynb").read_text()


def test_study_out_keeps_an_existing_study(capsys, tmp_path, ln_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text('{"mine": true}')
    code, _, err = command(capsys, "study", "--model", str(ln_dir), "--data", "demo", "--seq-len", "16",
                           "--max-tokens", "32", "--out", str(out), "--state-dir", str(tmp_path / "s"))
    assert code == 2 and "not a new or empty directory" in err and (out / "study.json").read_text() == '{"mine": true}'
