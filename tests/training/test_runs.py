"""Runs of ``remove-ln``: 2 processes equal 1, an interrupted run resumes to the same result, the control, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import PROMPTS, launch_two
from noln_core import load_model
from noln_core.cli import main
from noln_core.corpus import text_corpus
from noln_core.training import trainer
from noln_core.training.recipe import recipe
from noln_core.training.removal import finetune

TEXT = " ".join(PROMPTS * 40)
ARGS = ["--steps", "12", "--batch", "4", "--grad-accum", "2", "--seq-len", "32", "--lr", "2e-4", "--warmup", "2",
        "--eval-every", "4", "--checkpoint-every", "5", "--device", "cpu"]


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "_training" / "loss_log.jsonl").read_text().splitlines()]


def trained_state(out) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (σ, flags) of the finished run, as its last checkpoint holds them."""
    return load_file(out / "_training" / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, ln_dir, data):
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *ARGS]) == 0
    return out


def test_two_processes_equal_one(one_process, ln_dir, data, tmp_path):
    """``accelerate launch`` (2 processes, gloo on the CPU), same global batch: the same loss log, the same σ and
    the same function (log-probs to 1e-5).

    (FSDP cannot be tested here: accelerate runs it only on accelerators, and a CPU launch with ``--use_fsdp``
    is refused in one line (the next tests); ``bench/gpu_check.sh`` runs the FSDP launch where a GPU is lent.)
    """
    out = tmp_path / "two"
    proc = launch_two("remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["processes"] == 2
    distributed = json.loads((out / "removal.json").read_text())["distributed"]
    assert distributed["type"] == "MULTI_CPU" and distributed["sharded_parameters"] == 0
    one, two = log_of(one_process), log_of(out)
    assert [e["processes"] for e in two] == [2] * 12 and [e["processes"] for e in one] == [1] * 12
    assert [e["step"] for e in two] == [e["step"] for e in one] and [e["removed"] for e in two] == [e["removed"] for e in one]
    assert [e["tokens"] for e in two] == [e["tokens"] for e in one]
    for a, b in zip(one, two):
        for key in ("loss", "aux", "lr") + (("eval_loss",) if "eval_loss" in a else ()):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    # What the two trained models compute, not their raw weights: Adam turns float noise in parameters whose true
    # gradient is about zero (the attention key bias: softmax ignores a per-query constant) into learning-rate-sized
    # steps, so those raw weights differ by ~1e-5 while the models agree far better.
    s1, s2 = trained_state(one_process), trained_state(out)
    assert s1.keys() == s2.keys()
    for key in [k for k in s1 if k.endswith(("sigma", "sigma_bos", "ema", "fake"))]:  # the σ estimates and flags
        assert torch.allclose(s1[key].double(), s2[key].double(), rtol=1e-6, atol=0), key
    models = [load_model(str(d), device="cpu") for d in (one_process, out)]
    for text in PROMPTS:
        ids = torch.tensor([[50256] + models[0].tokenizer.encode(text).ids])
        lp = [m.forward(ids).log_softmax(-1) for m in models]
        assert (lp[0] - lp[1]).abs().max().item() < 1e-5, text
    # ... and the runs did train: the result is not the base
    base = load_model(str(ln_dir), device="cpu")
    assert not torch.allclose(models[1].forward(torch.tensor([[1, 2, 3]])), base.forward(torch.tensor([[1, 2, 3]])),
                              atol=1e-3)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, ln_dir):
    r = recipe(steps=12, batch=4, grad_accum=2, seq_len=32, lr=1e-3, warmup=2)
    kwargs = dict(eval_every=4, checkpoint_every=5, device="cpu")
    whole = finetune(ln_dir, text_corpus(TEXT), tmp_path / "whole", r, **kwargs)

    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt  # as Ctrl-C does: the step in progress finishes and is saved

    with pytest.raises(KeyboardInterrupt):
        finetune(ln_dir, text_corpus(TEXT), tmp_path / "cut", r, on_step=interrupt, **kwargs)
    assert json.loads((tmp_path / "cut" / "_training" / "state.json").read_text())["step"] == 7
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    again = finetune(ln_dir, text_corpus(TEXT), tmp_path / "cut", r, **kwargs)
    strip = lambda log: [{k: v for k, v in e.items() if k != "time"} for e in log]  # noqa: E731
    assert strip(log_of(tmp_path / "cut")) == strip(log_of(tmp_path / "whole"))
    a, b = trained_state(tmp_path / "whole"), trained_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.eval_loss == whole.eval_loss and again.initial_eval_loss == whole.initial_eval_loss


def test_ctrl_c_saves_the_finished_steps_and_the_cli_resumes(tmp_path, ln_dir, data, monkeypatch, capsys):
    original, calls = trainer._rows, [0]

    def rows(*args):
        calls[0] += 1
        if calls[0] == 7:  # mid-step 3 (two micro-batches a step): the step still finishes
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(trainer, "_rows", rows)
    out = tmp_path / "out"
    cmd = ["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *ARGS]
    assert main(cmd) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert [e["step"] for e in log_of(out)] == [0, 1, 2, 3]
    monkeypatch.setattr(trainer, "_rows", original)
    assert main(cmd) == 0
    assert "resuming at step 4" in capsys.readouterr().err
    assert [e["step"] for e in log_of(out)] == list(range(12))


def test_a_different_run_in_the_same_directory_is_refused(one_process, ln_dir, data, capsys):
    code = main(["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(one_process),
                 *ARGS[:-2], "--seed", "3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a different run" in err and err.count("\n") == 1


def test_control_keeps_its_layer_norms(tmp_path, ln_dir, data, capsys):
    out = tmp_path / "ft"
    assert main(["remove-ln", "--control", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "ln_control"
    model = load_model(str(out), device="cpu")
    assert not model.ln_free and model.info.eps == pytest.approx(1e-5)
    assert any(part.startswith("ln") for n in model.hook_names() for part in n.split("."))
    weights = load_file(out / "model.safetensors")
    assert weights["transformer.h.0.ln_1.weight"].abs().max() < 100  # no x1e6 trick
    log = log_of(out)
    assert all(e["removed"] == [] and e["aux"] == 0 for e in log)
    info = json.loads((out / "removal.json").read_text())
    assert info["kind"] == "ln_control" and info["schedule"] is None
    assert "control" in (out / "README.md").read_text()


def test_preset_is_written_into_the_model_card(tmp_path, ln_dir, data, capsys):
    out = tmp_path / "p"
    args = ["remove-ln", "--preset", "small", "--base", str(ln_dir), "--data", str(data), "--out", str(out),
            "--steps", "56", "--batch", "2", "--grad-accum", "1", "--seq-len", "16", "--eval-every", "0",
            "--checkpoint-every", "100", "--device", "cpu"]
    assert main(args) == 0
    info = json.loads((out / "removal.json").read_text())
    r, s = info["recipe"], info["schedule"]
    assert (r["preset"], r["lr"], r["min_lr"], r["aux_lambda"], r["warmup"]) == ("small", 6e-4, 3e-4, 0.1, 25)
    assert (r["steps"], r["batch"], r["seq_len"]) == (56, 2, 16)  # explicit flags override the preset
    assert (s["start_ln2"], s["gap_ln2"], s["gap_v"]) == (20, 2, 3) and s["start_qk"] == 20 + 3 * 2
    card = (out / "README.md").read_text()
    assert "the papers' **small** preset" in card and "ln_1 V from" in card
    assert load_model(str(out), device="cpu").ln_free


@pytest.mark.parametrize("args, message", [
    (["--base", "/nope"], "no directory"),
    (["--data", "/nope.txt"], "no such corpus"),
    (["--steps", "5"], "too few"),
    (["--batch", "3", "--grad-accum", "2"], "does not split"),
    (["--seq-len", "500"], "longer than"),
    (["--gaps", "2,2"], "three positive integers"),
    (["--momentum", "1.5"], "must be in [0, 1)"),
    (["--micro-batch", "3", "--batch", "4"], "not a multiple of --micro-batch"),
])
def test_cli_remove_ln_errors(tmp_path, capsys, ln_dir, data, args, message):
    base = ["--base", str(ln_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "40",
            "--seq-len", "16", "--batch", "2", "--device", "cpu"]
    merged = dict(zip(base[::2], base[1::2]))
    merged.update(dict(zip(args[::2], args[1::2])))
    code = main(["remove-ln", *[x for kv in merged.items() for x in kv]])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_cli_refuses_an_ln_free_base(tmp_path, capsys, noln_dir, data):
    code = main(["remove-ln", "--base", str(noln_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 2 and "already LN-free" in capsys.readouterr().err


def test_help_names_presets_control_and_accelerate():
    proc = subprocess.run([sys.executable, "-m", "noln_core", "remove-ln", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for word in ("--preset", "small,medium,large,xl", "--control", "accelerate launch", "--micro-batch", "--grad-accum"):
        assert word in proc.stdout.replace("\n", " ").replace("  ", " ") or word in proc.stdout


# --- nothing the user had is overwritten -------------------------------------------------------------------------

def test_remove_ln_never_writes_over_the_users_files(tmp_path, ln_dir, data, capsys):
    """Into an existing model directory (the probe replaced model.safetensors, config.json, README.md and
    removal.json, exit 0) and into the base itself: refused in one line, every file as it was."""
    theirs = tmp_path / "their-model"
    shutil.copytree(ln_dir, theirs)
    (theirs / "README.md").write_text("their card")
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    for out, message in ((theirs, "not a run of this tool"), (ln_dir, "the base model's own directory")):
        code = main(["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *ARGS])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    assert main(["remove-ln", "--base", str(theirs), "--data", str(data), "--out", str(theirs), *ARGS]) == 2
    capsys.readouterr()


def test_a_failed_run_does_not_block_its_corrected_rerun_and_a_new_budget_rebuilds_the_data(tmp_path, ln_dir, data,
                                                                                          capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    assert main(["remove-ln", "--base", str(ln_dir), "--data", str(empty), "--out", str(out), *ARGS]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not list(out.rglob("*.partial"))  # nothing half-made left behind
    seen = []
    original = trainer.prepare_chunks
    monkeypatch.setattr(trainer, "prepare_chunks", lambda *a, **k: seen.append(k.get("max_tokens")) or
                        original(*a, **k))
    few = [*ARGS[:ARGS.index("--steps")], "--steps", "2", *ARGS[ARGS.index("--steps") + 2:], "--control"]
    assert main(["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *few,
                 "--max-tokens", "4000", "--checkpoint-every", "100"]) == 0
    capsys.readouterr()
    # Same out, another budget, a finished checkpoint there: a different run, refused (never silently reused).
    code = main(["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(out), *few, "--max-tokens",
                 "3000", "--checkpoint-every", "100"])
    assert code == 2 and "holds a different run" in capsys.readouterr().err
    assert seen == [4000]


def test_the_model_files_appear_only_when_the_run_ends(tmp_path, ln_dir):
    out = tmp_path / "out"
    during = []
    finetune(ln_dir, text_corpus(TEXT), out, recipe(steps=2, batch=4, seq_len=32, aux_lambda=0.0), control=True,
             eval_every=0, checkpoint_every=100, device="cpu",
             on_step=lambda step: during.append(sorted(p.name for p in out.iterdir())))
    assert during == [["_training"], ["_training"]]
    assert {"model.safetensors", "config.json", "README.md", "removal.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "_training" / "export").exists()


def test_fsdp_fallback_is_said_only_when_fsdp_was_asked_for_and_not_given():
    from noln_core.training.trainer import fsdp_fallback

    assert fsdp_fallback("MULTI_CPU", {}) is None and fsdp_fallback("FSDP", {"ACCELERATE_USE_FSDP": "true"}) is None
    assert "falls back to one plain process" in fsdp_fallback("NO", {"ACCELERATE_USE_FSDP": "true"})


def test_an_fsdp_launch_without_accelerators_is_refused_in_one_line(ln_dir, data, tmp_path):
    """accelerate cannot run FSDP on CPUs: the run says so and what to launch instead, not an unexpected error."""
    proc = subprocess.run(
        [shutil.which("accelerate"), "launch", "--use_fsdp", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "noln_core", "remove-ln", "--base", str(ln_dir),
         "--data", str(data), "--out", str(tmp_path / "fsdp"), *ARGS],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0
    assert ("error: FSDP (--use_fsdp) needs accelerators (CUDA, XPU, ...) and none is here: on CPUs launch with "
            "--multi_gpu") in proc.stderr and "unexpected" not in proc.stderr
    assert not (tmp_path / "fsdp").exists()
