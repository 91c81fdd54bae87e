"""What an operating-system error at a path mlora writes means, and what the user can do.

``OSError.strerror`` says what happened ("Not a directory") but neither where (a file in the
middle of the path? which one?) nor what to do. Every write error mlora reports goes through
``write_problem``, so a full disk, a read-only mount, a missing permission, a file where a
folder belongs, a symlink loop or a name too long all read as one line naming the path, the
cause and the remedy.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# errno -> what to do (the operating system's words come first in the message)
_REMEDY = {
    errno.ENOSPC: "free space on that disk, or write to another place",
    errno.EDQUOT: "free space within your quota, or write to another place",
    errno.EROFS: "the file system is mounted read-only: write to a writable place",
    errno.EACCES: "give this user write permission there, or write to another place",
    errno.EPERM: "give this user write permission there, or write to another place",
    errno.EISDIR: "a folder is where a file belongs: move it away, or write to another place",
    errno.ELOOP: "symbolic links there point at each other: fix the link, or write elsewhere",
    errno.ENAMETOOLONG: "the file system refuses a name or path that long: use a shorter one",
}


def blocking_file(path: Path) -> Path | None:
    """The first existing non-folder on the way to ``path`` (``path`` itself excluded): what
    makes creating ``path`` fail with "Not a directory" or "File exists"."""
    for part in reversed(path.parents):
        if part.exists() and not part.is_dir():
            return part
        if part.is_symlink() and not part.exists():
            return part  # a dangling link where a folder must be
    return None


def write_problem(path: Path, exc: OSError) -> str:
    """What went wrong writing ``path`` and what to do, as one phrase.

    Args:
        path: the file or folder the user will look for (never a temporary name).
        exc: the error the operating system gave.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = blocking_file(path)
        if blocker is None and exc.errno == errno.EEXIST and os.path.lexists(path):
            blocker = path
        if blocker is not None and blocker.is_symlink() and not blocker.exists():
            return (
                f"{blocker} is a symbolic link that leads to no folder (dangling or looping): "
                "fix the link, or write to another place"
            )
        if blocker is not None:
            return f"{blocker} is a file, not a folder: move it away, or write to another place"
        return f"{reason}: a file is where a folder belongs; move it away, or write elsewhere"
    remedy = _REMEDY.get(exc.errno or 0)
    return f"{reason} ({remedy})" if remedy else reason
