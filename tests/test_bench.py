"""The benchmarks' own plumbing: each writes only its section of BENCHMARKS.md, and none runs silently."""

from __future__ import annotations

import ast
from pathlib import Path

from bench.run import CPU_HEADING, HEADER, document, replace_section

ROOT = Path(__file__).resolve().parent.parent


def _sections(text: str) -> dict[str, str]:
    parts, current = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            current = line.strip()
        parts[current] = parts.get(current, "") + line
    return parts


def test_bench_run_rewrites_only_the_cpu_section_of_the_real_document():
    existing = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    new = document("### cpu · a fresh table\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", existing)
    before, after = _sections(existing), _sections(new)
    assert list(before) == list(after)  # the same sections, in the same order
    for heading in before:
        if heading == CPU_HEADING:
            assert "a fresh table" in after[heading] and "a fresh table" not in before[heading]
        else:
            assert after[heading] == before[heading], heading  # the study, GPU, hosted and notes sections stay


def test_a_section_is_added_once_and_replaced_in_place():
    doc = replace_section(HEADER, "## Study", "first\n")
    doc = replace_section(doc + "## Later\n\nkept\n", "## Study", "second\n")
    assert doc.count("## Study") == 1 and "second" in doc and "first" not in doc and doc.endswith("kept\n")
    assert doc.index("## Study") < doc.index("## Later")


def test_every_benchmark_reports_progress_as_it_goes():
    """bench.study once printed nothing for 26 minutes: each benchmark's main says what it is doing."""
    for name in ("run", "study", "removal", "hosted_memory", "hosted_mixed", "findings"):
        source = (ROOT / "bench" / f"{name}.py").read_text()
        tree = ast.parse(source)
        said = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "say"]
        driver = next((n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                       and getattr(n.targets[0], "id", "") == "DRIVER"), "")
        assert said or "file=sys.stderr, flush=True" in driver, name
