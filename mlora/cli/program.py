"""How the user started a command line, for usage lines and hints (no heavy imports: every
command, ``--help`` and ``launch.py gen`` included, reads it before anything else loads)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def program_name(script: str, console_script: str, module: str) -> str:
    """How the user started a command line, for its usage line and hints: the console script
    (``mlora``), the checkout's wrapper (``mlora.py``) or ``python -m MODULE``; ``script`` when
    it cannot tell (e.g. under a test runner)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path(script)
    spec = importlib.util.find_spec(module)
    if spec and spec.origin and argv0.suffix == ".py" and argv0.resolve() == Path(spec.origin):
        return f"python -m {module}"
    return argv0.name if argv0.name in (script, console_script) else script
