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
