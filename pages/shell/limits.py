"""What a deployment allows (hosted mode and its limits), from ``.streamlit/noln.toml`` and the environment.

Pure Python (no Streamlit), so it can be tested on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_TEXT_CHARS = 20_000
"""Longer text is cut here before tokenising (and to the context window after)."""
CONFIG_FILE = Path(__file__).resolve().parents[2] / ".streamlit" / "noln.toml"


@dataclass(frozen=True)
class Limits:
    """What a deployment allows.  Hosted mode: registry models only, no local paths, tighter limits."""

    hosted: bool = False
    max_tokens: int | None = None
    """Tokens analysed at most (None: each model's context window)."""
    max_models: int = 4
    """Models resident at once; the least recently used is evicted."""
    max_text_chars: int = MAX_TEXT_CHARS
    run_cache_mb: int = 1024
    """Memory the cache of runs and their analyses may hold, shared by every session (least recently used evicted)."""
    load_wait_s: int | None = None
    """Seconds a session waits for its turn to load before it is told to try again (None: no limit)."""
    model_memory_mb: int | None = None
    """Memory the resident models' weights may take; a model that cannot fit is refused before it loads."""
    study_max_tokens: int | None = None
    """The Study page's largest budget (None: no cap)."""
    study_max_upload_mb: int = 10
    """The largest corpus file the Study page accepts (it is kept in memory, never written to disk)."""
    study_cache_mb: int | None = None
    """Disk the Study page's saved studies may take (None: no cap); the least recently used go first."""
    patch_max_tokens: int = 256
    """The Patching page's longest prompt pair (activation patching runs ``n x layers`` short passes)."""
    means_max_sequences: int = 250
    """The Neurons page's most sequences for the ablation means (the papers' 250)."""
    benchmark_max_limit: int | None = None
    """The Study page's benchmarks: items per task at most (None: every item)."""


def load_limits(env=None, path: Path = CONFIG_FILE) -> Limits:
    """Limits from ``.streamlit/noln.toml``, with ``NOLN_HOSTED``, ``NOLN_MAX_TOKENS`` and ``NOLN_MAX_MODELS`` overriding."""
    import tomllib

    env = os.environ if env is None else env
    try:
        config = tomllib.loads(path.read_text()) if path.is_file() else {}
    except (tomllib.TOMLDecodeError, OSError):
        config = {}
    hosted_cfg, local_cfg = config.get("hosted", {}), config.get("local", {})
    flag = env.get("NOLN_HOSTED")
    hosted = flag.lower() in ("1", "true", "yes", "on") if flag else bool(hosted_cfg.get("enabled", False))
    section = hosted_cfg if hosted else local_cfg

    def number(name: str, key: str, default):
        """The environment's value, else the config file's, else ``default``; invalid values are skipped."""
        for raw in (env.get(name), section.get(key)):
            try:
                value = int(raw)
            except (TypeError, ValueError):
                continue
            if value > 0:
                return value
        return default

    return Limits(
        hosted=hosted,
        max_tokens=number("NOLN_MAX_TOKENS", "max_tokens", 256 if hosted else None),
        max_models=number("NOLN_MAX_MODELS", "max_models", 3 if hosted else 4),
        max_text_chars=min(number("NOLN_MAX_TEXT_CHARS", "max_text_chars", MAX_TEXT_CHARS), MAX_TEXT_CHARS),
        run_cache_mb=number("NOLN_RUN_CACHE_MB", "run_cache_mb", 256 if hosted else 1024),
        model_memory_mb=number("NOLN_MODEL_MEMORY_MB", "model_memory_mb", 6000 if hosted else None),
        load_wait_s=number("NOLN_LOAD_WAIT_S", "load_wait_s", 120 if hosted else None),
        study_max_tokens=number("NOLN_STUDY_MAX_TOKENS", "study_max_tokens", 32_768 if hosted else None),
        study_max_upload_mb=number("NOLN_STUDY_MAX_UPLOAD_MB", "study_max_upload_mb", 5 if hosted else 10),
        study_cache_mb=number("NOLN_STUDY_CACHE_MB", "study_cache_mb", 500 if hosted else None),
        patch_max_tokens=number("NOLN_PATCH_MAX_TOKENS", "patch_max_tokens", 64 if hosted else 256),
        means_max_sequences=number("NOLN_MEANS_MAX_SEQUENCES", "means_max_sequences", 50 if hosted else 250),
        benchmark_max_limit=number("NOLN_BENCHMARK_MAX_LIMIT", "benchmark_max_limit", 100 if hosted else None),
    )


LIMITS = load_limits()
"""This process's limits, read once at start-up."""
