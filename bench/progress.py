"""One line on stderr for each stage of a benchmark, with the time since it began: a long run is never silent."""

from __future__ import annotations

import sys
import time

_START = time.time()


def say(message: str) -> None:
    print(f"[{time.time() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)
