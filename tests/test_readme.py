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
