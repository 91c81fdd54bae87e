"""Network use: none for local files, and a fast answer when the Hugging Face hub is unreachable.

Two library defaults made a run slow or chatty: ``datasets`` sends a usage-counter request even
for a local JSON file, and an unreachable hub makes ``huggingface_hub`` retry every file for
over a minute before the error. Here a local load never counts usage, and the first hub id of a
process probes the hub once (a few seconds at most): unreachable, the process goes offline, so
the libraries answer from their cache at once or fail in one line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("mlora")

PROBE_TIMEOUT_S = 5.0


@contextmanager
def no_usage_counter() -> Iterator[None]:
    """``datasets`` loads without its download-counter request (a local file needs none)."""
    from datasets import config

    before = config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        config.HF_UPDATE_DOWNLOAD_COUNTS = before


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _go_offline() -> None:
    """Offline mode for the libraries that read the hub (their flags are read at each call)."""
    import datasets.config
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


@functools.cache
def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached (None: it answered), probed once per process through
    ``huggingface_hub``'s own HTTP session (its proxies and endpoint), without retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # any transport failure: DNS, refused, timeout, proxy
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def is_hub_id(name_or_path: str) -> bool:
    """A hub repo id (``name`` or ``org/name``), not a local path (existing or path-like)."""
    if name_or_path.startswith((".", "/", "~", "\\")) or Path(name_or_path).expanduser().exists():
        return False
    return name_or_path.count("/") <= 1 and "\\" not in name_or_path


def before_loading(name_or_path: str, what: str) -> None:
    """``before_hub_access`` when ``name_or_path`` is a hub id (``what``: "base model", naming
    it in the warning)."""
    if is_hub_id(name_or_path):
        before_hub_access(f"{what} {name_or_path}")


def before_hub_access(what: str) -> None:
    """Call before ``what`` (a hub id) is read: an unreachable hub turns on offline mode once,
    so the cache answers at once or the load fails fast with the library's one-line reason."""
    if _hub_offline():
        return
    reason = hub_unreachable_reason()
    if reason is not None:
        logger.warning(
            "%s: the hub (huggingface.co) is unreachable (%s); using the local cache only "
            "(HF_HUB_OFFLINE=1)",
            what,
            reason,
        )
        _go_offline()
