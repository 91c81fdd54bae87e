"""Writes that never lose work: atomic files and folders, disk-full and permission errors as one
line naming the path with the previous files intact, half-written checkpoints never resumed
from, safe loading (safetensors / ``weights_only``) and remote code off by default.
"""

from __future__ import annotations

import ast
import errno
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mlora
from mlora.core.atomic import WriteError, atomic_directory, atomic_write_bytes, output_lock
from mlora.core.errors import MloraError
from mlora.training.checkpoints import find_resume_point, list_checkpoints
from tests.reliability_support import (
    HARNESS,
    fake_checkpoint,
    fake_cut,
    mlora_args,
    one_error_line,
    run_identity,
    run_mlora,
    small_identity,
    write_run_config,
)

PACKAGE = Path(mlora.__file__).parent
DENIED = "Permission denied (give this user write permission there, or write to another place)"


def leftovers(folder: Path) -> list[Path]:
    return list(folder.rglob(".*.tmp*"))


def test_disk_full_and_permission_denied_mid_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_run_config(tmp_path / "cfg")
    full, denied = tmp_path / "full", tmp_path / "denied"
    (full / "short").mkdir(parents=True)
    earlier = b"an adapter from an earlier run"
    (full / "short" / "adapter_model.safetensors").write_bytes(earlier)
    runs = [
        # the disk fills up while "short" replaces its earlier final adapter
        (mlora_args(tiny_model_dir, config, full, "--overwrite"), "ENOSPC:short/.adapter_model"),
        # permission is lost while acc's checkpoint-4 is being written (in the background)
        (mlora_args(tiny_model_dir, config, denied), "EACCES:acc/.checkpoint-4"),
    ]
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(run_mlora, args, HARNESS, MLORA_TEST_FAIL=fault) for args, fault in runs
        ]
        first, second = (f.result() for f in futures)

    assert first.returncode == 2, first.stderr
    target = full / "short" / "adapter_model.safetensors"
    assert one_error_line(first.stderr) == (
        f"error: cannot write {target}: {os.strerror(28)} (free space on that disk, or write to "
        "another place)"
    )
    assert target.read_bytes() == earlier
    assert not leftovers(full)

    assert second.returncode == 2, second.stderr
    target = denied / "acc" / "checkpoint-4" / "adapter_model.safetensors"
    assert one_error_line(second.stderr) == (
        f"error: cannot write {target}: {os.strerror(13)} (give this user write permission "
        "there, or write to another place)"
    )
    assert not (denied / "acc" / "checkpoint-4").exists() and not leftovers(denied)
    assert [step for step, _ in list_checkpoints(denied / "acc")] == [2]  # its own schedule
    point = find_resume_point(denied, run_identity(config, tiny_model_dir))
    assert point.global_step == 6  # --resume picks up from here (sgd's checkpoint-2)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_run_config(tmp_path / "cfg")
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = run_mlora(mlora_args(tiny_model_dir, config, out))
    finally:
        out.chmod(0o700)
    assert result.returncode == 2
    assert one_error_line(result.stderr) == f"error: cannot write {out}: {DENIED}"


def test_a_second_run_into_a_folder_in_use_stops_at_once(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """While one run holds DIR, another one into DIR exits with one line naming the holder's
    pid and writes nothing (before: both passed the checks and one replaced the other)."""
    config = write_run_config(tmp_path / "cfg")
    out = tmp_path / "out"
    with output_lock(out):
        result = run_mlora(mlora_args(tiny_model_dir, config, out))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        f"error: {out} is in use by another mlora run (pid {os.getpid()}); wait for it to end "
        "or pass another --dir"
    )
    assert sorted(p.name for p in out.iterdir()) == [".mlora-lock"]


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    """SIGKILL of the holder frees the folder: a crash never leaves a stale lock."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from mlora.core.atomic import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(60)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = rf"in use by another mlora run \(pid {holder.pid}\)"
        with pytest.raises(MloraError, match=busy), output_lock(out):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(out):  # free again
        assert (out / ".mlora-lock").read_text() == str(os.getpid())


def fail_fsync(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)


def test_atomic_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "weights.bin"
    atomic_write_bytes(path, b"old")
    fail_fsync(monkeypatch, errno.ENOSPC)
    with pytest.raises(
        WriteError, match=f"^cannot write {path}: No space left on device \\(free space"
    ):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]


def test_renames_are_made_durable_by_fsyncing_the_folder(tmp_path: Path, monkeypatch) -> None:
    """After the rename, the parent folder itself is fsynced (power loss keeps the new name)."""
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert synced == ["file", "dir"]
    synced.clear()
    with atomic_directory(tmp_path / "folder") as tmp:
        atomic_write_bytes(tmp / "b.bin", b"y")
    assert synced == ["file", "dir", "dir"] and (tmp_path / "folder" / "b.bin").read_bytes() == b"y"


def test_atomic_directory_is_complete_or_absent(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "checkpoint-3"
    with atomic_directory(folder) as tmp:
        atomic_write_bytes(tmp / "a", b"1")
    with atomic_directory(folder) as tmp:  # replacing a folder swaps it whole
        atomic_write_bytes(tmp / "a", b"2")
    assert (folder / "a").read_bytes() == b"2"
    fail_fsync(monkeypatch, errno.EACCES)
    with pytest.raises(WriteError) as caught, atomic_directory(folder) as tmp:
        atomic_write_bytes(tmp / "b", b"3")
    assert str(caught.value) == f"cannot write {folder / 'b'}: {DENIED}"  # final name
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "other") as tmp:
        raise RuntimeError("a crash half-way")
    assert sorted(tmp_path.iterdir()) == [folder] and (folder / "a").read_bytes() == b"2"


def test_half_written_checkpoints_are_never_resumed_from(tmp_path: Path) -> None:
    out, identity = tmp_path / "out", small_identity("a")
    records = identity.records(out)
    fake_checkpoint(out, "a", "checkpoint-2")
    fake_cut(records, identity, 2, {"a": "checkpoint-2"})
    # A kill while checkpoint-4 was written: its files are all there, under the temp name.
    fake_checkpoint(out, "a", ".checkpoint-4.k2j3.tmp")
    fake_cut(records, identity, 4, {"a": "checkpoint-4"})
    # A kill while the manifest of step 6 was written.
    fake_checkpoint(out, "a", "checkpoint-6")
    fake_cut(records, identity, 6, {"a": "checkpoint-6"}, folder_name=".step-6.x81q.tmp")
    assert [step for step, _ in list_checkpoints(out / "a")] == [2, 6]
    assert find_resume_point(out, identity).path == records / "step-2"
    with pytest.raises(MloraError, match="nothing to resume"):
        find_resume_point(out, small_identity("a", "b"))  # a cut of another run is not ours


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == name:
                found.append((path, node))
    return found


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_torch_pickles_are_read_with_weights_only() -> None:
    loads = [(p, c) for p, c in calls("load") if ast.unparse(c.func) == "torch.load"]
    assert loads, "expected torch.load calls (optimizer state, legacy adapter_model.bin)"
    for path, call in loads:
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"


def test_remote_code_is_off_unless_asked() -> None:
    loads = calls("from_pretrained") + calls("from_config")
    for path, call in loads:
        value = keyword(call, "trust_remote_code")
        where = f"{path.relative_to(PACKAGE)}:{call.lineno} {ast.unparse(call.func)}"
        if ast.unparse(call.func).startswith(("Auto", "transformers.Auto")):
            assert value is not None, f"{where} does not pass trust_remote_code"
        assert not (isinstance(value, ast.Constant) and value.value is True), where
    from mlora.cli.train import build_parser

    args = build_parser().parse_args(["--base_model", "m", "--config", "c"])
    assert args.trust_remote_code is False


def test_launch_run_passes_trust_remote_code_only_when_given() -> None:
    from mlora.cli.launch import build_parser, mlora_argv

    parser = build_parser()
    assert "--trust_remote_code" not in mlora_argv(parser.parse_args(["run", "--config", "c"]))
    args = parser.parse_args(["run", "--config", "c", "--trust_remote_code"])
    assert "--trust_remote_code" in mlora_argv(args)


def test_atomic_writes_get_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "file", b"x")
    with atomic_directory(tmp_path / "folder") as tmp:
        atomic_write_bytes(tmp / "inside", b"y")
    assert (tmp_path / "file").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "folder" / "inside").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_fresh_run_clears_leftovers_of_its_own_adapters_only(tmp_path: Path) -> None:
    from mlora.training.checkpoints import clear_run_state

    fake_checkpoint(tmp_path, "a", ".checkpoint-4.k2j3.tmp")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".checkpoint-1.abcd.tmp").mkdir()
    clear_run_state(tmp_path, small_identity("a"))
    assert list((tmp_path / "a").iterdir()) == []
    assert (tmp_path / "other" / ".checkpoint-1.abcd.tmp").is_dir()


def test_a_fresh_run_leaves_other_runs_records_and_adapters(tmp_path: Path) -> None:
    """Config C trains (or --overwrite's) adapter a; the interrupted run A (a, b) keeps b's
    checkpoint and its own records, so only what C names is replaced."""
    from mlora.training.checkpoints import clear_run_state, list_cuts

    run_a, run_c = small_identity("a", "b"), small_identity("a", seed=2)
    fake_checkpoint(tmp_path, "a", "checkpoint-2")
    fake_checkpoint(tmp_path, "b", "checkpoint-2")
    fake_cut(run_a.records(tmp_path), run_a, 2, {"a": "checkpoint-2", "b": "checkpoint-2"})
    fake_cut(run_c.records(tmp_path), run_c, 2, {"a": "checkpoint-2"})
    clear_run_state(tmp_path, run_c)
    assert not run_c.records(tmp_path).exists()
    assert [s for s, _ in list_cuts(run_a.records(tmp_path))] == [2]
    assert list_checkpoints(tmp_path / "a") == []  # C's adapter: replaced
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2]  # the neighbour's: kept


def test_records_of_the_layout_before_run_ids_are_adopted_when_they_match(tmp_path: Path):
    from mlora.training.run_records import RUN_DIR

    identity = small_identity("a")
    fake_checkpoint(tmp_path, "a", "checkpoint-2")
    fake_cut(tmp_path / RUN_DIR, identity, 2, {"a": "checkpoint-2"})  # DIR/.mlora-run/step-2
    with pytest.raises(MloraError, match="it was trained with --seed 1, not 3"):
        find_resume_point(tmp_path, small_identity("a", seed=3))
    assert (tmp_path / RUN_DIR / "step-2").is_dir()  # not taken by a run that is not its own
    assert find_resume_point(tmp_path, identity).path == identity.records(tmp_path) / "step-2"
    assert not (tmp_path / RUN_DIR / "step-2").exists()
