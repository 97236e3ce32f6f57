"""``python -m noln_core study``: the JSON schema, the files of --out, one-line errors, and 2 processes = 1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import launch_two
from noln_core.cli import main
from noln_core.study.report import markdown

ARGS = ["--data", "demo", "--seq-len", "32", "--max-tokens", "320", "--batch", "4", "--bootstrap", "100",
        "--device", "cpu"]


def study(capsys, tmp_path, *args):
    code = main(["study", *args, "--state-dir", str(tmp_path / "state")])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def models(ln_dir, noln_dir, exploding_dir) -> list[str]:
    """With LN, LN-free, and LN-free exploding to millions of nats on a few tokens (the totals must stay exact)."""
    return ["--model", str(ln_dir), "--model", str(noln_dir), "--model", str(exploding_dir)]


@pytest.fixture(scope="module")
def doc_and_files(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    proc = subprocess.run([sys.executable, "-m", "noln_core", "study", *models, *ARGS, "--neurons", "3,17",
                           "--json", "--out", str(tmp / "out"), "--state-dir", str(tmp / "state")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), tmp / "out", tmp


def test_json_schema(doc_and_files):
    doc, _, _ = doc_and_files
    assert doc["processes"] == 1 and doc["seq_len"] == 32 and doc["complete"] is True
    assert doc["n_sequences"] == 10
    for m in doc["models"]:
        assert {"name", "source", "revision", "ln_free", "n_sequences", "n_tokens", "ce", "entropy", "ece", "nmae",
                "first_token_norm", "sink_rate", "exploding"} <= set(m)
        assert m["n_sequences"] == 10 and m["n_tokens"] == 10 * 31
        assert set(m["ce"]) == {"mean", "ci95", "median", "percentiles", "tokens_beyond_32_nats"}
        lo, hi = m["ce"]["ci95"]
        assert lo < m["ce"]["mean"] < hi
        assert set(m["nmae"]) >= {"mean", "ci95", "definition", "value_bias", "bootstrap"}
        assert m["nmae"]["definition"] == "last-token" and m["nmae"]["value_bias"] == "b_O"
        assert set(m["sink_rate"]) == {"papers", "gu2024"}
        assert isinstance(m["exploding"], list)
        norms = m["first_token_norm"]
        assert norms["labels"] == ["embed", "pos_embed", "L0 mid", "L0 post", "L1 mid", "L1 post", "L2 mid", "L2 post",
                                   "ln_final"]
        assert len(norms["mean"]) == len(norms["std"]) == len(norms["max"]) == 9
    assert doc["models"][1]["ln_free"] and doc["models"][1]["nmae"]["mean"] < 1e-9
    exploding = doc["models"][2]
    assert exploding["ce"]["percentiles"]["99.95"] > 1e6 and exploding["ce"]["tokens_beyond_32_nats"] > 0
    assert max(e["max_loss"] for e in exploding["exploding"]) > 1e6
    assert doc["settings"]["value_bias"]["counted_in"] == "b_O"
    assert len(doc["pairs"]) == 3
    pair = doc["pairs"][0]
    assert {"a", "b", "kl_ab", "kl_ba", "js", "top1_agreement"} <= set(pair)
    assert pair["a"] == doc["models"][0]["name"]


def test_out_writes_json_csv_and_markdown(doc_and_files):
    doc, out, _ = doc_and_files
    assert json.loads((out / "study.json").read_text()) == doc
    rows = list(csv.DictReader(open(out / "study.csv")))
    assert [r["name"] for r in rows] == [m["name"] for m in doc["models"]]
    assert float(rows[0]["ce_mean"]) == pytest.approx(doc["models"][0]["ce"]["mean"])
    md = (out / "study.md").read_text()
    assert f"{doc['models'][0]['ce']['mean']:.4f}" in md and "published" not in md  # no paper model here


def _as_figure(doc, name):
    """``doc`` relabelled as if measured on figure ``name``'s models, dataset and settings."""
    from dataclasses import asdict

    from noln_core.study.published import FIGURES

    figure = FIGURES[name]
    doc = json.loads(json.dumps(doc))
    for m, spec in zip(doc["models"], figure.models):
        m["source"], m["revision"] = spec, None
    doc["corpus_spec"] = {"kind": "dataset", "source": figure.dataset, "config": figure.config, "split": figure.split,
                          "field": figure.column, "sampling": asdict(figure.sampling)}
    doc.update(seq_len=figure.seq_len, bos=figure.bos, max_tokens=figure.max_tokens)
    doc["settings"]["nmae_target"] = figure.nmae_target
    return doc


def test_markdown_prints_published_numbers_only_with_the_figures_settings(doc_and_files):
    doc, _, _ = doc_and_files
    md = markdown(_as_figure(doc, "ce-small-pile-filtered"))
    assert "*published: CE (Baroni et al. 2025, ce-small-pile-filtered)*" in md
    assert "*2.7899*" in md and "*2.8112*" in md and "*2.8757*" in md and "pile_eval.py lines 31-89" in md
    assert "ce-small-owt" in md and "other corpora" in md  # named, never printed
    md = markdown(_as_figure(doc, "nmae-small"))
    assert "*49.07*" in md and "*57.85*" in md and "*0.00*" in md
    # One setting off (the length), and the published row gives way to the reason.
    changed = _as_figure(doc, "nmae-small")
    changed["seq_len"] = 256
    md = markdown(changed)
    assert "*49.07*" not in md and "differs in seq len 256 (figure: 512)" in md and "--reproduce nmae-small" in md
    changed = _as_figure(doc, "nmae-small")
    changed["corpus_spec"]["sampling"]["seed"] = None
    assert "sampling seed None (figure: 42)" in markdown(changed)
    # The sinks figure: 55.3% is the fine-tune with LN's column (sink_rate.py), the original's cell stays empty.
    md = markdown(_as_figure(doc, "sinks-medium"))
    assert "| *published: Sink rate % (papers' definition) (Baroni et al. 2025, sinks-medium)* |  | *55.3* | *45.3* |" in md
    # Local models have no published numbers at all.
    assert "published" not in markdown(doc)


def test_two_processes_equal_one(doc_and_files, models):
    """``accelerate launch`` with 2 processes (gloo on the CPU) gives the 1-process JSON, but for ``processes``,
    losses of millions of nats and the neuron ablations included."""
    one, _, tmp = doc_and_files
    proc = launch_two("study", *models, *ARGS, "--neurons", "3,17", "--json", "--state-dir", str(tmp / "state2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(proc.stdout)
    assert two["processes"] == 2
    assert [p.name for p in (tmp / "state2").rglob("*") if p.is_file()] == ["result.pt"]  # the shards merged, then gone
    two["processes"] = one["processes"]
    assert two["neurons"]["processes"] == 2 and one["neurons"]["processes"] == 1
    two["neurons"]["processes"] = 1
    assert one["neurons"]["models"][1]["effects"][0]["loss"]["mean"] > 0
    assert two == one


def test_interrupted_run_exits_130_and_resumes(ln_dir, tmp_path):
    state = tmp_path / "state"
    cmd = [sys.executable, "-c", (
        "import sys, noln_core.study.engine as e\n"
        "orig = e.measure_batch\n"
        "n = [0]\n"
        "def stop(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: raise KeyboardInterrupt\n"
        "    return orig(*a, **k)\n"
        "e.measure_batch = stop\n"
        "from noln_core.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"), "study", "--model", str(ln_dir), *ARGS, "--json", "--state-dir", str(state)]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 130
    assert first.stderr.strip().splitlines()[-1].startswith("error: stopped after 4 sequences")
    assert json.loads(first.stdout)["complete"] is False
    second = subprocess.run([sys.executable, "-m", "noln_core", "study", "--model", str(ln_dir), *ARGS, "--json",
                             "--state-dir", str(state)], capture_output=True, text=True)
    assert second.returncode == 0 and "resuming: 4 of 10" in second.stderr
    assert json.loads(second.stdout)["n_sequences"] == 10


@pytest.mark.parametrize("extra, message", [
    (["--data", "EMPTY"], "is empty"),
    (["--data", "BAD"], "not UTF-8"),
    (["--data", "someone/no-such-dataset"], "not in the local cache and the hub is offline"),
    (["--data", "JSONL", "--field", "body"], "has no field 'body'"),
    (["--data", "demo", "--max-tokens", "10"], "smaller than one sequence of 32"),
    (["--data", "demo", "--metrics", "ce,vibes"], "unknown metric 'vibes'"),
    (["--data", "demo", "--batch", "0"], "--batch 0 must be at least 1"),
    (["--data", "demo", "--model", "VOCAB"], "different tokenizers"),
])
def test_bad_input_gets_one_line(capsys, tmp_path, ln_dir, extra, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    (tmp_path / "c.jsonl").write_text('{"text": "hello"}\n')
    other = tmp_path / "vocab"
    if "VOCAB" in extra:
        from checkpoints import save, tiny_config
        from transformers import GPT2LMHeadModel

        save(GPT2LMHeadModel(tiny_config(vocab_size=50300)), other)
        capsys.readouterr()
    swap = {"EMPTY": str(tmp_path / "empty.txt"), "BAD": str(tmp_path / "bad.txt"), "JSONL": str(tmp_path / "c.jsonl"),
            "VOCAB": str(other)}
    extra = [swap.get(x, x) for x in extra]
    code, out, err = study(capsys, tmp_path, "--model", str(ln_dir), "--seq-len", "32", "--device", "cpu", *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
