"""Real file systems that refuse writes: a tiny tmpfs that fills up mid-run (ENOSPC; also
under ``--log_file``) and read-only mounts (EROFS), before and during a run, through the real
``mlora.py``.

chmod is not enough (the tests run as root in CI, and root ignores permissions), so these mount
file systems; where mounting is not permitted (not root, no CAP_SYS_ADMIN) they skip, saying so.
Every failure must be one line naming the path, the cause and what to do; nothing written before
may be lost; and after space is freed, ``--resume`` must end where the uninterrupted run ends.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.bad_files import failure_line, run_forked
from tests.reliability_support import (
    final_weights,
    max_relative_difference,
    mlora_args,
    write_run_config,
)

TOLERANCE = 1e-5  # a resume that replays steps (as test_reliability_resume.py allows)
FULL_SIZE = "192k"  # holds the first checkpoints of the run below, not all of them


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Folders to mount file systems on; unmounted afterwards (newest first)."""
    mounted: list[Path] = []
    yield mounted
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def tmpfs(point: Path, size: str, mounted: list[Path]) -> Path:
    """A tmpfs of ``size`` at ``point``; skips the test where mounting is not permitted."""
    point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    try:
        mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"mounting a tmpfs is not permitted here: {exc.stderr.strip()}")
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    mounted.append(point)
    return point


def read_only(point: Path) -> None:
    mount("-o", "remount,ro", str(point))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_disk_full_and_read_only_mounts(
    tiny_model_dir: Path, tmp_path: Path, mounts: list[Path]
) -> None:
    config = write_run_config(tmp_path / "cfg")
    full = tmpfs(tmp_path / "full", FULL_SIZE, mounts)
    (full / "out" / "earlier").mkdir(parents=True)  # another run's adapter on the same disk
    (full / "out" / "earlier" / "adapter_model.safetensors").write_bytes(b"earlier work" * 100)
    locked = tmpfs(tmp_path / "locked", "1m", mounts)
    (locked / "earlier").mkdir()
    (locked / "earlier" / "adapter_config.json").write_text("{}")
    read_only(locked)
    during = tmp_path / "during"  # a writable folder; one adapter's folder is a read-only mount
    read_only(tmpfs(during / "sgd", "1m", mounts))
    log = tmpfs(tmp_path / "log", "4k", mounts) / "run.log"
    (log.parent / "filler").write_bytes(b"x" * 4096)  # full: the log's first write meets ENOSPC
    before = {"full": files(full), "locked": files(locked)}

    names = ["reference", "full", "locked", "during", "log"]
    outs = [tmp_path / "reference", full / "out", locked, during, tmp_path / "logged"]
    jobs = [
        {"cwd": str(tmp_path), "argv": mlora_args(tiny_model_dir, config, out),
         "stdout": str(tmp_path / f"{n}.out"), "stderr": str(tmp_path / f"{n}.err")}
        for n, out in zip(names, outs, strict=True)
    ]  # fmt: skip
    jobs[-1]["argv"] += ["--log_file", str(log)]
    codes = dict(zip(names, run_forked(jobs), strict=True))
    stderr = {n: (tmp_path / f"{n}.err").read_text() for n in names}
    assert codes["reference"] == 0, stderr["reference"]

    # The disk filled up mid-run: one line, the earlier adapter untouched, no temporaries.
    line = failure_line(codes["full"], stderr["full"], mid_run=True)
    assert f"error: cannot write {full / 'out'}" in line, line
    assert "No space left on device (free space on that disk, or write to another place)" in line
    assert "finished, saved to" in stderr["full"]  # it failed mid-run, after writing something
    assert all(files(full)[name] == data for name, data in before["full"].items())
    assert not list(full.rglob(".*.tmp*"))

    # A read-only file system before the run: one line before anything loads.
    line = failure_line(codes["locked"], stderr["locked"])
    assert line == (
        f"error: cannot write {locked}: Read-only file system (the file system is mounted "
        "read-only: write to a writable place)"
    )
    assert files(locked) == before["locked"]

    # A read-only folder met during the run: one line naming it; what was written stays whole.
    line = failure_line(codes["during"], stderr["during"], mid_run=True)
    assert line == (
        f"error: cannot write {during / 'sgd' / 'checkpoint-2'}: Read-only file system (the file "
        "system is mounted read-only: write to a writable place)"
    )
    assert codes["during"] == 2
    finished = load_file(during / "short" / "adapter_model.safetensors")  # written before
    assert finished.keys() == final_weights(tmp_path / "reference")["short"].keys()

    # The log file's disk filled up: said once, the run goes on to the end.
    assert codes["log"] == 0, stderr["log"]
    assert "Traceback" not in stderr["log"] and "Logging error" not in stderr["log"]
    warnings = [line for line in stderr["log"].splitlines() if "--log_file" in line]
    assert warnings == [
        f"warning: --log_file: cannot write {log}: No space left on device (free space on that "
        "disk, or write to another place); the log goes on on stderr only"
    ]

    # Space freed: --resume ends where the uninterrupted run ends.
    mount("-o", "remount,size=64m", str(full))
    resume = {**jobs[1], "argv": [*jobs[1]["argv"], "--resume"]}
    (code,) = run_forked([resume])
    assert code == 0, (tmp_path / "full.err").read_text()
    difference = max_relative_difference(
        final_weights(full / "out"), final_weights(tmp_path / "reference")
    )
    assert difference <= TOLERANCE
    assert (full / "out" / "earlier" / "adapter_model.safetensors").read_bytes() == (
        b"earlier work" * 100
    )
