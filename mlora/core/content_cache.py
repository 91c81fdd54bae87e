"""Where mlora keeps what it derives from user files, keyed by their content.

Shared by the caches that skip repeated work across runs: the GGUF conversion
(``mlora.model.base_model``), the demo model and the tokenized training data
(``mlora.data.token_cache``). Keys are content hashes, never paths or times, so a changed file
is redone and the same file under two names is done once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def mlora_home() -> Path:
    """``$MLORA_HOME``, else ``~/.cache/mlora``: where mlora caches what it builds."""
    home = os.environ.get("MLORA_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mlora"


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
