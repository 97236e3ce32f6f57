"""Every Python snippet of the README runs as written, offline (on the demo models), from an empty directory,
with nothing but what the README's install gives: no PYTHONPATH pointing at the checkout, no warning of a
deprecated API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 3  # the library, nnsight and TransformerLens


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs_offline_from_an_empty_directory(index, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPETS[index])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", str(script)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "a snippet shows something"
    assert "deprecated" not in proc.stderr.lower(), proc.stderr[-2000:]


def _bash_blocks() -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S) if lang in ("", "bash")]


def test_the_readmes_worked_example_prints_what_the_readme_shows(tmp_path):
    """The `compare` worked example, run from an empty directory on the tiny checkpoints the README names."""
    from checkpoints import neutralise, random_gpt2, save

    (example,) = [b for b in _bash_blocks() if b.startswith("$ python -m noln_core compare")]
    command, shown = example.split("\n15 tokens", 1)
    save(random_gpt2(seed=1), tmp_path / "tiny-ln")
    save(neutralise(random_gpt2(seed=1)), tmp_path / "tiny-noln")
    args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', command.replace("\\\n", " "))][1:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args[1:], "--device", "cpu"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    number = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
    got, want = proc.stdout.strip(), ("15 tokens" + shown).strip()
    assert re.split(number, got) == re.split(number, want)  # every word, label and layout as shown
    for a, b in zip(map(float, re.findall(number, got)), map(float, re.findall(number, want))):
        # printed to 4 digits; float rounding errors (1e-7) differ between BLAS builds but stay tiny
        assert abs(a - b) <= max(2e-4, 1e-3 * abs(b)) or (abs(a) < 1e-5 and abs(b) < 1e-5), (a, b)


def test_the_readmes_notebook_command_writes_a_notebook_of_that_view(tmp_path):
    (block,) = [b for b in _bash_blocks() if b.startswith("python -m noln_core notebook")]
    command = block.split("#")[0].replace("\\\n", " ")
    args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', command)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    cells = json.loads((tmp_path / "attribution.ipynb").read_text())["cells"]
    setup = "".join(cells[2]["source"])
    assert "TEXT = 'And God said, Let there be light: and there was'" in setup and "demo:gpt2-kjv-noLN" in setup


def _command_lines() -> list[list[str]]:
    """Every runnable command line of the README's shell blocks that starts noln_core (directly or under
    `accelerate launch`), comments dropped; usage synopses (`[--flag]`, `...`) are not commands."""
    import shlex

    lines = []
    for block in _bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").strip()
            if line.startswith(("python -m noln_core", "accelerate launch")) and "[" not in line and "..." not in line:
                lines.append(shlex.split(line, comments=True))
    return lines


def _split(tokens: list[str]) -> tuple[int, list[str]]:
    """(processes, the noln_core arguments) of a command line, the launcher's flags checked by its own parser."""
    if tokens[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(tokens[2:])
        assert launch.module and launch.training_script == "noln_core", tokens
        if launch.fsdp_transformer_layer_cls_to_wrap:  # the class FSDP wraps is the removal model's block
            import noln_core.training.model as removal_model

            assert isinstance(getattr(removal_model, launch.fsdp_transformer_layer_cls_to_wrap, None), type)
        return launch.num_processes or 1, list(launch.training_script_args)
    assert tokens[:3] == ["python", "-m", "noln_core"], tokens
    return 1, tokens[3:]


def test_every_readme_command_line_parses_and_makes_a_run_its_flags_allow():
    """Each `python -m noln_core …` and `accelerate launch … -m noln_core …` line of the README, hub ones included:
    the launcher and the CLI accept every flag, and a removal's recipe (preset, global batch over micro-batches and
    processes, schedule over the base's layers) resolves with the CLI's own code, so no line fails at its start."""
    from types import SimpleNamespace

    from noln_core.cli import _parser, _study_plan, removal_recipe
    from noln_core.loading import load_model
    from noln_core.training.recipe import SIZES

    shapes = {"openai-community/gpt2" + suffix: SIZES[size] for suffix, size in
              (("", "small"), ("-medium", "medium"), ("-large", "large"), ("-xl", "xl"))}
    commands = _command_lines()
    seen = set()
    for tokens in commands:
        processes, argv = _split(tokens)
        args = _parser().parse_args(argv)  # an unknown flag exits here (SystemExit fails the test)
        seen.add(args.command)
        if args.command == "remove-ln":
            if args.base.startswith("demo:"):
                info = load_model(args.base).info
                n_layer, n_embd = info.n_layers, info.d_model
            else:
                n_layer, n_embd = shapes[args.base]
            config = SimpleNamespace(n_layer=n_layer, n_embd=n_embd, n_positions=1024 if not args.base.startswith(
                "demo:") else load_model(args.base).info.n_ctx)
            r = removal_recipe(args, config, processes)
            assert r.batch % processes == 0 and r.grad_accum >= 1
            if args.micro_batch:
                assert r.batch == args.micro_batch * processes * r.grad_accum
        if args.command == "study" and args.reproduce and args.reproduce != "list":
            assert _study_plan(args)["models"]
    assert {"compare", "remove-ln", "study", "notebook", "patch", "benchmark"} <= seen, seen


def _run_line(start: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    (tokens,) = [t for t in _command_lines() if " ".join(t).startswith(start)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *tokens[1:], *extra], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_the_readmes_offline_removal_and_study_lines_run_from_an_empty_directory(tmp_path):
    """The README's offline shell lines, run as written from an empty directory but shortened (argparse takes the
    last flag): `remove-ln` on the demo model with the fewest steps its schedule allows and 2 sequences a step, not
    300 x 8 (six minutes here), and the demo `study` on 4,096 tokens, not the whole demo corpus (two minutes)."""
    import json

    words = "and the lord said unto moses behold i am with thee in the land of egypt".split()
    (tmp_path / "my_corpus.txt").write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60))
                                                      for i in range(200)))
    removal = _run_line("python -m noln_core remove-ln --base demo:gpt2-kjv", tmp_path, "--steps", "21", "--batch", "2")
    summary = json.loads(removal.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "ln_free" and summary["steps"] == 21 and summary["eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "runs/kjv-noLN/config.json").is_file()
    _run_line("python -m noln_core study --model demo:gpt2-kjv", tmp_path, "--max-tokens", "4096")
    study = json.loads((tmp_path / "study/study.json").read_text())
    assert [m["name"] for m in study["models"]] == ["demo:gpt2-kjv", "demo:gpt2-kjv-noLN"]
    assert (tmp_path / "study/study.md").read_text().count("demo:gpt2-kjv-noLN") >= 1
    listing = _run_line("python -m noln_core study --reproduce list", tmp_path).stdout
    assert "nmae-small" in listing and "sinks-medium" in listing


def test_the_readmes_offline_findings_lines_run_as_written(tmp_path):
    """The entropy-neuron and patching lines on the demo models, exactly as the README writes them."""
    neurons = _run_line("python -m noln_core compare --model demo:gpt2-kjv --model demo:gpt2-kjv-noLN", tmp_path)
    assert neurons.stdout.count("ablating neuron") == 6 and "through the final LN 0.0%" in neurons.stdout
    patched = _run_line("python -m noln_core patch --model demo:gpt2-kjv", tmp_path).stdout
    assert "demo:gpt2-kjv-noLN (LN-free)" in patched and "resid_pre NMAE" in patched
