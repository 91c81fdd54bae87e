"""Atomic file and folder writes: a file is either the old one or the complete new one.

Every write goes to a temporary name in the same folder, is flushed and fsynced, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows), and the folder is fsynced so
the rename itself is durable. A folder is written under a
temporary name and renamed into place, so readers never see it half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlora.core.errors import MloraError
from mlora.core.os_errors import write_problem


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create owner-only (0600/0700) entries; what we rename into place should get
# the permissions a plain open()/mkdir() gives, or a serving process under another user could
# not read the adapters.
_UMASK = _current_umask()


class WriteError(MloraError):
    """A file or folder could not be written (disk full, permission denied, ...).

    Attributes:
        path: the file or folder the user will look for (never a temporary name).
        reason: what went wrong and what to do (``os_errors.write_problem``).
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def _os_error(path: Path, exc: OSError) -> WriteError:
    return WriteError(path, write_problem(path, exc))


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (survives power loss, not only a crash).

    Best effort: platforms that cannot open a folder (Windows) skip it.
    """
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    Raises:
        WriteError: disk full, permission denied, ... (one line naming the path); the previous
            file, if any, is left intact.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        _fsync_directory(path.parent)
    except OSError as exc:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        raise _os_error(path, exc) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    On any error the temporary folder is removed and ``path`` is untouched; a failed write of a
    file inside it is reported under the file's final name (``path/NAME``), not the temporary one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~_UMASK)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        yield tmp
        if path.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(path, exc) from None
    except WriteError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.path.is_relative_to(tmp):
            raise WriteError(path / exc.path.relative_to(tmp), exc.reason) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LOCK_NAME = ".mlora-lock"


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output ``folder`` for a whole training run.

    Two runs started into the same folder would both pass the "already exists" checks and then
    silently replace each other's adapters and checkpoints; the second one now stops at once.
    The lock is ``flock`` on ``folder/.mlora-lock`` (holding the owner's pid): the operating
    system releases it when the process ends, even by SIGKILL, so a crash never leaves a stale
    lock. Readers (evaluation, generation) take no lock. Where ``fcntl`` does not exist
    (Windows) no lock is taken.

    Raises:
        MloraError: another process holds the lock (naming its pid), or the folder cannot be
            created or written.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as exc:
        raise _os_error(folder, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise MloraError(
                f"{folder} is in use by another mlora run (pid {holder}); wait for it to end "
                "or pass another --dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
