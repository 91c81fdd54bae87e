"""``exit_now`` keeps everything the interpreter's shutdown would do that a user can see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import atexit, sys, threading, time
from pathlib import Path
from mlora.core.process_exit import exit_now
folder = Path(sys.argv[1])
atexit.register(lambda: (folder / "atexit").write_text("ran"))
def late():
    time.sleep(0.2)
    (folder / "thread").write_text("done")
threading.Thread(target=late).start()
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # not waited for
sys.stdout.write("buffered, no newline")
sys.stderr.write("to stderr")
exit_now(3)
"""


def test_exit_now_waits_for_threads_runs_exit_handlers_and_flushes(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 3
    assert (done.stdout, done.stderr) == ("buffered, no newline", "to stderr")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
