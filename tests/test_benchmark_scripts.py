"""Every benchmark script still starts: its imports resolve and ``--help`` parses.

Benchmarks are not run by the suite (they time things), so a rename elsewhere can break one
unnoticed; two did once (a helper they imported had moved). One interpreter runs each script's
``--help`` as ``__main__``, which imports everything the script needs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/bench_*.py"), ROOT / "benchmarks" / "peft_train_one.py"])

DRIVER = """
import contextlib, io, os, runpy, sys
failed = []
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as ``python benchmarks/x.py`` would
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        failed.append(f"{script}: --help did not exit")
    except SystemExit as done:
        if done.code not in (0, None) or "usage:" not in out.getvalue():
            failed.append(f"{script}: exit {done.code}")
    except BaseException as exc:
        failed.append(f"{script}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""


def test_every_benchmark_script_imports_and_parses_help() -> None:
    assert len(SCRIPTS) >= 10
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *map(str, SCRIPTS)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
