"""Where the package's shipped data lives: the one list of these paths.

``noln_core/data/gpt2-tokenizer`` holds GPT-2's ``vocab.json`` and
``merges.txt`` (for checkpoints that ship no tokenizer); ``noln_core/data/demo``
holds the offline demo models and their held-out text.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TOKENIZER_DIR = DATA_DIR / "gpt2-tokenizer"
"""GPT-2's vocab.json and merges.txt, shared by every model in the registry."""
DEMO_DIR = DATA_DIR / "demo"
"""The shipped offline demo checkpoints, one folder each, and ``heldout.jsonl`` (the held-out chapters, one a line)."""
CACHE_DIR = Path(os.environ.get("NOLN_CACHE_DIR") or Path("~/.cache/noln_core").expanduser())
"""Where results worth keeping between runs go (the neuron means): ``NOLN_CACHE_DIR``, else ``~/.cache/noln_core``."""
