"""The package a newcomer installs: what it declares, what it puts on PATH, and where its version lives."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import noln_core

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"noln_core", "pages", "__future__"}


def test_every_package_the_library_and_app_import_is_a_declared_runtime_dependency():
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    sources = [*(ROOT / "noln_core").rglob("*.py"), *(ROOT / "pages").rglob("*.py"), ROOT / "app.py"]
    distributions = metadata.packages_distributions()
    missing = {}
    for module in _third_party_imports(sources):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported at run time but not declared in pyproject.toml: {missing}"
    # The design's packages each serve the user at run time.
    assert {"streamlit", "torch", "transformers", "transformer-lens", "plotly", "pandas"} <= declared


def test_the_version_is_written_once_and_installed_as_such():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "noln_core.__version__"}
    assert metadata.version("noln-explorer") == noln_core.__version__
    readme = (ROOT / "README.md").read_text()
    assert set(re.findall(r'"noln_core_version": "([^"]+)"', readme)) == {noln_core.__version__}


def test_the_noln_script_is_the_module_cli_from_any_directory(tmp_path):
    (script,) = [e for e in metadata.distribution("noln-explorer").entry_points if e.name == "noln"]
    assert script.value == "noln_core.cli:main"
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", "from noln_core.cli import main; import sys; sys.exit(main())",
                          "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"noln_core {noln_core.__version__}", out.stderr
    listed = subprocess.run([sys.executable, "-m", "noln_core", "models"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert listed.returncode == 0 and "demo:gpt2-kjv-noLN" in listed.stdout, listed.stderr[-500:]


def test_the_package_ships_its_data_and_the_requirements_install_it():
    assert "-e ." in (ROOT / "requirements.txt").read_text().splitlines()
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["noln_core"]
    assert data == ["data/**/*"] and (Path(noln_core.__file__).parent / "data" / "gpt2-tokenizer").is_dir()
    assert "noln_core" in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"][0]


def test_ci_installs_exactly_what_the_readme_installs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert [line for line in ci if "pip " in line] == ["pip install -r requirements-dev.txt && python -m pytest"]
    pinned = [line for line in (ROOT / "requirements-dev.txt").read_text().splitlines() if line.startswith("torch")]
    readme = (ROOT / "README.md").read_text()
    assert len(pinned) == 1 and pinned[0].split("==")[1] in readme  # the README says which torch the tests ran with
