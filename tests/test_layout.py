"""The package's shape: layers import only downward, no import circle, no private name reached across modules.

The layers, lowest first (README, "Design"):
  core      noln_core/*.py (errors, paths, model, tokenizer, checkpoint, divergence, readout, registry, loading,
            store, compare, corpus)
  analyses  noln_core/analyses/
  findings  noln_core/findings/ (the papers' other findings: runs on loaded models, beside the analyses)
  viz       noln_core/viz/
  training  noln_core/training/
  study     noln_core/study/ (training and study: the scale-out consumers, beside viz)
  teaching  noln_core/teaching/ (guided tours, beside viz)
  entry     noln_core/__init__.py, __main__.py, cli.py, cli_findings.py
and the app above all of them (app.py, pages/), which no module of noln_core imports.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "noln_core"
ENTRY = {"noln_core", "noln_core.__main__", "noln_core.cli", "noln_core.cli_findings"}
RANK = {"core": 0, "analyses": 1, "findings": 1, "viz": 2, "training": 2, "study": 2, "teaching": 2, "entry": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANK else "core"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import of noln_core modules in ``path``, function-level ones included."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            for name in names:  # ``from X import y`` where y is a module imports that module
                candidate = PACKAGE.parent.joinpath(*f"{target}.{name}".split("."))
                is_module = candidate.with_suffix(".py").is_file() or candidate.is_dir()
                found.append((f"{target}.{name}" if is_module else target, [] if is_module else [name]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(t, n) for t, n in found if t == "noln_core" or t.startswith("noln_core.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in SOURCES}


def test_every_module_is_in_a_named_layer():
    assert {layer(m) for m in GRAPH} == set(RANK)
    for sub in ("analyses", "findings", "viz", "training", "study", "teaching"):
        assert (PACKAGE / sub / "__init__.py").is_file()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_downward_only(module):
    for target, _ in GRAPH[module]:
        if target == module or target == "noln_core" and layer(module) == "entry":
            continue
        assert target != "noln_core", f"{module} imports the package facade; import the module it needs"
        assert RANK[layer(target)] < RANK[layer(module)] or layer(target) == layer(module), (
            f"{module} ({layer(module)}) imports {target} ({layer(target)}), a layer above or beside it")
        consumers = {"training", "study"}
        assert not (layer(module) == "viz" and layer(target) in consumers), (module, target)
        assert not (layer(module) in consumers and layer(target) == "viz"), (module, target)


def test_the_import_graph_has_no_circle():
    edges = {m: {t for t, _ in GRAPH[m] if t in GRAPH and t != m} for m in GRAPH}
    # A package's __init__ re-exporting its own modules is not a circle of the code.
    edges = {m: {t for t in ts if not (m.count(".") < t.count(".") and t.startswith(m + "."))} for m, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_private_name_is_taken_from_another_module(module):
    for target, names in GRAPH[module]:
        if target != module:
            assert not [n for n in names if n.startswith("_") and not n.endswith("__")], f"{module} takes {names} from {target}"


def test_the_core_imports_no_streamlit():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m.split(".")[0] == "streamlit"], path


def test_no_noln_core_module_imports_the_app():
    for path in SOURCES:
        text = path.read_text()
        assert "from pages" not in text and "import pages" not in text, path


def test_declared_python_is_the_lowest_the_code_parses_on_and_this_one_meets_it():
    """pyproject's requires-python is the version CI runs (the lowest declared), and every file parses for it."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared.startswith(">=3.")
    minor = int(declared.removeprefix(">=3."))
    assert sys.version_info[:2] >= (3, minor)
    for path in [*SOURCES, ROOT / "app.py", *(ROOT / "pages").rglob("*.py")]:
        ast.parse(path.read_text(), feature_version=(3, minor))


def test_every_page_but_the_default_has_its_first_request_shim():
    """pages/NAME.py runs app.py only (pages/__init__.py says why); nothing else sits at the top of pages/."""
    from pages import PAGES

    shims = {p.stem for p in (ROOT / "pages").glob("*.py")} - {"__init__"}
    assert shims == {spec.name for spec in PAGES[1:]}
    for name in shims:
        code = [line for line in (ROOT / "pages" / f"{name}.py").read_text().splitlines()
                if line and not line.startswith(('"""', "import", "from"))]
        assert code == ['runpy.run_path(str(Path(__file__).resolve().parents[1] / "app.py"), run_name="__main__")']
