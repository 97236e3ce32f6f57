"""First-request shim: see ``pages/__init__.py``.  Runs ``app.py``, which opens the Patching page."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "app.py"), run_name="__main__")
