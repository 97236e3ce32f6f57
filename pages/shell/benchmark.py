"""The Study page's benchmarks: lm-evaluation-harness on the sidebar's models, its inputs and its cache.

Hosted, a visitor picks tasks from the harness's own list (no task files, no paths) and each task runs on at most
``benchmark_max_limit`` items; locally a folder of one's own task YAMLs may be named too.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from noln_core import NolnError
from noln_core.study.benchmark import COMPLETION_TASK, Benchmark, harness_index, run_benchmark
from pages.shell import cache, limits
from pages.shell.display import error

DEFAULT_TASKS = ("hellaswag",)


def harness_tasks(include: str | None = None) -> tuple[str, ...]:
    """``include``'s task names, then the harness's own (indexed once per process: it takes seconds)."""
    own = tuple(sorted(harness_index(include, defaults=False).all_tasks)) if include else ()
    with st.spinner("Listing lm-evaluation-harness's tasks (once)…"):
        return own + tuple(sorted(harness_index().all_tasks))


@st.cache_data(max_entries=16, show_spinner=False)
def _run(specs: tuple, tasks: tuple[str, ...], limit: int | None, include: str | None) -> Benchmark:
    models = [cache.load(*spec) for spec in specs]
    with st.spinner(f"lm-evaluation-harness: {', '.join(tasks)} on {len(models)} model(s)…"):
        return run_benchmark(models, list(tasks), limit, include)


def section(specs: tuple) -> Benchmark | None:
    """Inputs, the Run button, and the result (kept for the session); None until a benchmark has run."""
    if not st.toggle("Benchmark the sidebar's models", key="w_bench_on",
                     help="Lists the harness's tasks (a few seconds, once) and shows the benchmark's inputs."):
        return st.session_state.get("_benchmark")
    hosted = limits.LIMITS.hosted
    include = None
    if not hosted:
        folder = st.text_input("Your own task folder (optional)", key="w_bench_include",
                               help="A folder of lm-evaluation-harness task YAMLs, e.g. a task on local data "
                                    "(the harness's --include_path). Hosted Spaces run the harness's own tasks only.")
        if folder.strip():
            path = Path(folder.strip()).expanduser()
            if not path.is_dir():
                error(f"{folder.strip()!r} is not a folder of task YAMLs")
                return None
            include = str(path)
    try:
        options = (COMPLETION_TASK,) + harness_tasks(include)
    except Exception as err:  # a broken task file in the folder: one line, the inputs kept
        error(f"lm-evaluation-harness could not read the tasks: {str(err).splitlines()[0][:200] if str(err) else err}")
        return None
    tasks = st.multiselect("Tasks", options, default=[t for t in DEFAULT_TASKS if t in options], key="w_bench_tasks",
                           help=f"The harness's tasks, scored by the harness; {COMPLETION_TASK} is the nanoGPT-style "
                                "HellaSwag scoring (Heimersheim 2024's table is likely of that kind).")
    cap = limits.LIMITS.benchmark_max_limit
    limit = st.number_input("Items per task" + (f" (at most {cap} here)" if cap else " (0: every item)"),
                            min_value=1 if cap else 0, max_value=cap, value=min(100, cap or 100), step=10,
                            key="w_bench_limit")
    if st.button("Run benchmark", key="w_bench_run", disabled=not tasks):
        try:
            st.session_state["_benchmark"] = _run(specs, tuple(tasks), int(limit) or None, include)
        except NolnError as err:
            error(str(err))
    return st.session_state.get("_benchmark")
