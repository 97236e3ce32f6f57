"""``benchmark``: lm-evaluation-harness runs offline on a local task in HellaSwag's format and its acc and acc_norm
equal an independent scoring of the same items; the completion-style variant equals build-nanogpt's script; the
table is side by side; 2 processes give the 1-process numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints import hf_model
from helpers import launch_two
from noln_core.cli import main
from noln_core.errors import InputError
from noln_core.study.benchmark import COMPLETION_TASK, run_benchmark
from papers import harness_hellaswag, nanogpt_hellaswag

ACTIVITIES = ["Baking cookies", "Washing a car", "Playing guitar", "Roof shingle removal"]
ENDINGS = ["puts the tray in the oven and waits.", "rinses the soap off with a hose.",
           "strums a chord and [title] starts to sing.", "pulls the old  shingles off the roof.",
           "sits down.", "walks to the door and opens it slowly, looking outside.", "laughs.",
           "picks up a ladder and climbs it."]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Twelve items in HellaSwag's raw format, and a task YAML that includes the harness's own hellaswag.yaml (its
    prompt, preprocessing and metrics) with the data read from the local file."""
    import lm_eval

    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(3)
    items = []
    for i in range(12):
        endings = [ENDINGS[j] for j in rng.choice(len(ENDINGS), 4, replace=False)]
        items.append({"ind": i, "activity_label": ACTIVITIES[i % 4], "ctx_a": "A man is standing in the yard.",
                      "ctx_b": "he", "ctx": "A man is standing in the yard. he", "split": "val",
                      "split_type": "indomain", "label": str(int(rng.integers(4))), "endings": endings})
    (root / "tiny.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    harness = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_hellaswag.yaml").write_text(
        f"include: {harness}\ntask: tiny_hellaswag\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {root / 'tiny.jsonl'}\ntraining_split: null\n")
    return root


def test_the_harness_scores_equal_an_independent_scoring(task_dir, ln_model, noln_model, ln_dir, noln_dir):
    result = run_benchmark([ln_model, noln_model], ["tiny_hellaswag", COMPLETION_TASK], include=str(task_dir / "tasks"),
                           batch_size=4, hellaswag_data=str(task_dir / "tiny.jsonl"))
    docs = [json.loads(line) for line in (task_dir / "tiny.jsonl").read_text().splitlines()]
    rows = {(r.task, r.metric): r for r in result.rows}
    assert set(rows) == {("tiny_hellaswag", "acc"), ("tiny_hellaswag", "acc_norm"), (COMPLETION_TASK, "acc"),
                         (COMPLETION_TASK, "acc_norm")}
    assert rows["tiny_hellaswag", "acc"].scoring.startswith("lm-evaluation-harness")
    assert rows[COMPLETION_TASK, "acc"].scoring.startswith("completion")
    encode = ln_model.tokenizer
    for k, directory in enumerate((ln_dir, noln_dir)):
        hf = hf_model(directory)
        acc, acc_norm = harness_hellaswag(hf, lambda t: encode.encode(t).ids, docs)
        assert rows["tiny_hellaswag", "acc"].scores[k].value == pytest.approx(acc, abs=1e-12)
        assert rows["tiny_hellaswag", "acc_norm"].scores[k].value == pytest.approx(acc_norm, abs=1e-12)
        se = np.sqrt(acc * (1 - acc) * 12 / 11 / 12)  # the sample standard deviation over the items, / sqrt(n)
        assert rows["tiny_hellaswag", "acc"].scores[k].stderr == pytest.approx(se, rel=1e-9)
        acc_c, acc_norm_c = nanogpt_hellaswag(hf, lambda t: encode.encode(t).ids, docs)
        assert rows[COMPLETION_TASK, "acc"].scores[k].value == pytest.approx(acc_c, abs=1e-12)
        assert rows[COMPLETION_TASK, "acc_norm"].scores[k].value == pytest.approx(acc_norm_c, abs=1e-12)
    assert result.models == (ln_model.info.name, noln_model.info.name) and result.ln_free == (False, True)


def test_two_processes_give_the_one_process_table(task_dir, ln_dir, noln_dir, tmp_path):
    args = ["benchmark", "--model", str(ln_dir), "--model", str(noln_dir), "--tasks",
            f"tiny_hellaswag,{COMPLETION_TASK}", "--include", str(task_dir / "tasks"), "--hellaswag-data",
            str(task_dir / "tiny.jsonl"), "--batch", "1", "--json", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "noln_core", *args, "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    doc = json.loads(one.stdout)
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text()) == doc
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| tiny_hellaswag | acc_norm | lm-evaluation-harness" in md and "(LN-free)" in md
    assert len((tmp_path / "out" / "benchmark.csv").read_text().splitlines()) == 1 + 4 * 2
    two = launch_two(*args, timeout=400)
    assert two.returncode == 0, two.stderr[-2000:]
    doc2 = json.loads(two.stdout)
    assert doc2["processes"] == 2
    doc2["processes"] = 1
    assert doc2 == doc


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_at_all"], "has no task 'no_such_task_at_all'"),
    (["--tasks", "hellaswag_completion", "--hellaswag-data", "/nope/hs.jsonl"], "no such HellaSwag file"),
    (["--tasks", "hellaswag_completion", "--limit", "0"], "--limit 0 must be at least 1"),
    (["--tasks", "x", "--include", "/nope"], "--include '/nope' is not a directory"),
])
def test_bad_requests_are_one_line_errors(capsys, ln_dir, args, message):
    code = main(["benchmark", "--model", str(ln_dir), *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.strip().startswith("error: ") and message in err, err


def test_no_task_is_refused(ln_model):
    with pytest.raises(InputError, match="no task"):
        run_benchmark([ln_model], [" "])
