"""The hosted Space: README front matter, Dockerfile and config agree with the documented command."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from noln_core.registry import DEFAULT_PAIR, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with the Space's YAML front matter"
    return yaml.safe_load(match.group(1))


def test_front_matter_makes_a_docker_space():
    meta = front_matter()
    assert meta["sdk"] == "docker" and meta["app_port"] == 8501 and meta["title"]


def test_default_models_are_preloaded():
    preload = front_matter()["preload_from_hub"]
    repos = {entry.split()[0]: entry.split() for entry in preload}
    for spec in DEFAULT_PAIR:
        repo, revision = parse_spec(spec)
        assert repo in repos and "config.json" in repos[repo][1]
        if revision:
            assert repos[repo][2] == revision


def test_dockerfile_runs_the_readme_command_on_the_space_port():
    docker = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", docker, re.M).group(1))
    readme_command = re.search(r"pip install -r requirements.txt && (streamlit run app.py)", (ROOT / "README.md").read_text())
    assert readme_command and " ".join(cmd) == readme_command.group(1)
    assert "pip install --no-cache-dir --user -r requirements.txt" in docker and "EXPOSE 8501" in docker
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["port"] == 8501 and config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False and config["server"]["maxUploadSize"] > 0


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"```bash\n(pip install -r requirements-dev.txt && [^\n]+)\n```", readme).group(1)
    assert command in ci.splitlines()
