"""Tokenized training data cached by content, so a rerun skips reading and tokenizing its data.

An entry is ``$MLORA_HOME/tokenized/<key>.safetensors`` (default ``~/.cache/mlora/...``):
the rows' token ids and labels as flat int32 tensors with per-row offsets, the data format and
the warnings tokenizing logged (replayed on a hit, so a cached run says what an uncached one
says). The key is a digest of everything the rows depend on: the data file's bytes, the
tokenizer (its serialized vocabulary and rules, special tokens, chat template), the caller's
tokenization settings (template, ``cutoff_len``, ``train_on_inputs``, format, validation split,
...) and ``CACHE_VERSION``. A source without a stable identity (a hub dataset, a slow tokenizer
whose files are unknown) is not cached.

The key and a digest of the tensors are stored inside the file: a damaged, truncated or stale
file is rebuilt with a warning, never trusted. Files are written atomically; the least
recently used are dropped beyond ``MAX_ENTRIES``. A cache that cannot be written (read-only
home, full disk) costs only the saving: the run goes on with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mlora.core.atomic import atomic_write_bytes
from mlora.core.content_cache import file_sha256, mlora_home
from mlora.core.errors import MloraError, first_line
from mlora.data.rows import TokenizedRow, local_data_path

# Bump when what tokenizing produces, or this file's layout, changes: older entries then miss.
CACHE_VERSION = 1
MAX_ENTRIES = 256
FOLDER = "tokenized"
SUFFIX = ".safetensors"

logger = logging.getLogger("mlora")

Built = tuple[str, list[TokenizedRow]]  # (data format, rows)

# tokenizer -> (its cheap settings when hashed, its digest): the serialization is hashed once
_tokenizer_ids: weakref.WeakKeyDictionary[Any, tuple[str, str | None]] = weakref.WeakKeyDictionary()
# (path, inode, size, mtime, ctime) -> sha256: a file read twice in a run is hashed once
_file_ids: dict[tuple[str, int, int, int, int], str] = {}


def cache_folder() -> Path:
    return mlora_home() / FOLDER


def source_identity(source: str) -> str | None:
    """The content hash of a local data file (hashed once per process per version of the
    file), or None for a hub dataset (its rows have no identity without loading them) or a
    file the uncached path will report (missing, unreadable, another format)."""
    try:
        path = local_data_path(source)
    except MloraError:  # missing, a folder, another format: the uncached path says so its way
        return None
    if path is None:
        return None
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in _file_ids:
            _file_ids[key] = file_sha256(path)
    except OSError:  # unreadable: the uncached path reports it in its words
        return None
    return _file_ids[key]


def tokenizer_identity(tokenizer: Any) -> str | None:
    """A digest of what decides a tokenizer's ids: a fast tokenizer's full serialization
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor), else its vocabulary
    file's bytes; with its special tokens and chat template. None: not identifiable."""
    settings = _tokenizer_settings(tokenizer)
    try:
        known, digest = _tokenizer_ids[tokenizer]
        if known == settings:  # nothing changed since it was hashed (the cheap part)
            return digest
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if backend is not None:
        body = backend.to_str()
    elif vocab_file and Path(vocab_file).is_file():
        body = file_sha256(Path(vocab_file))
    else:
        body = None
    digest = None if body is None else _digest({"body": body, "settings": settings})
    with suppress(TypeError):  # not weak-referenceable: computed each time
        _tokenizer_ids[tokenizer] = (settings, digest)
    return digest


def _tokenizer_settings(tokenizer: Any) -> str:
    """The cheap part of a tokenizer's identity, read each time: a changed chat template,
    special token or added token is seen even on a tokenizer hashed before."""
    return json.dumps(
        {
            "class": type(tokenizer).__name__,
            "size": len(tokenizer),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "ids": [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id],
            "chat_template": getattr(tokenizer, "chat_template", None),
            "add": [getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")],
        },
        sort_keys=True,
        default=str,
    )


def data_key(source: str, tokenizer: Any, settings: dict[str, Any]) -> str | None:
    """The cache key of ``source``'s rows tokenized by ``tokenizer`` with ``settings`` (every
    setting that changes the rows, JSON-able), or None where the rows cannot be cached."""
    content = source_identity(source)
    try:
        tokenizer_id = tokenizer_identity(tokenizer) if content is not None else None
    except (AttributeError, TypeError):  # not a transformers tokenizer: not identifiable
        tokenizer_id = None
    if tokenizer_id is None:
        return None
    parts = {"version": CACHE_VERSION, "source": source, "content": content}
    return _digest({**parts, "tokenizer": tokenizer_id, "settings": settings})


def cached_rows(key: str | None, build: Callable[[], Built]) -> Built:
    """``build()``'s ``(format, rows)``, read from the cache entry of ``key`` when it holds
    them, else built and stored there. ``key`` None: built, nothing read or written.

    Raises:
        whatever ``build`` raises (nothing is cached then).
    """
    if key is None:
        return build()
    path = cache_folder() / f"{key}{SUFFIX}"
    if path.is_file():
        try:
            fmt, rows, notes = _read(path, key)
        except Exception as exc:
            logger.warning(
                "tokenized data cache %s is damaged or stale (%s); rebuilding it",
                path,
                first_line(exc),
            )
        else:
            _touch(path)
            for level, message in notes:
                logger.log(level, "%s", message)
            return fmt, rows
    with _recorded_notes() as notes:
        fmt, rows = build()
    _store(path, key, fmt, rows, notes)
    return fmt, rows


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


@contextmanager
def _recorded_notes() -> Iterator[list[tuple[int, str]]]:
    """The warnings logged on the ``mlora`` logger inside the block, as (level, text)."""
    notes: list[tuple[int, str]] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append((record.levelno, record.getMessage()))

    recorder = Recorder(logging.WARNING)
    logger.addHandler(recorder)
    try:
        yield notes
    finally:
        logger.removeHandler(recorder)


def _tensors(rows: list[TokenizedRow]) -> dict[str, Any]:
    import torch

    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row.input_ids))
    flat_ids = [t for row in rows for t in row.input_ids]
    flat_labels = [t for row in rows for t in row.labels]
    return {
        "input_ids": torch.tensor(flat_ids, dtype=torch.int32),  # (sum L,)
        "labels": torch.tensor(flat_labels, dtype=torch.int32),  # (sum L,)
        "offsets": torch.tensor(offsets, dtype=torch.int64),  # (rows + 1,)
        "task": torch.tensor([row.task for row in rows], dtype=torch.int32),  # (rows,)
        "completion_start": torch.tensor([r.completion_start for r in rows], dtype=torch.int32),
    }


def _payload_digest(tensors: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _store(path: Path, key: str, fmt: str, rows: list[TokenizedRow], notes: list) -> None:
    """Write the entry (atomically), then drop the least recently used beyond ``MAX_ENTRIES``;
    a failed write is a warning."""
    from safetensors.torch import save

    if any(len(row.labels) != len(row.input_ids) for row in rows):
        return  # not representable as aligned offsets (no tokenizer path builds such rows)
    tensors = _tensors(rows)
    metadata = {
        "key": key,
        "version": str(CACHE_VERSION),
        "format": fmt,
        "notes": json.dumps(notes),
        "payload_sha256": _payload_digest(tensors),
    }
    try:
        atomic_write_bytes(path, save(tensors, metadata=metadata))
    except MloraError as exc:
        logger.warning("tokenized data not cached: %s", exc)
        return
    _prune(path.parent)


def _read(path: Path, key: str) -> tuple[str, list[TokenizedRow], list[tuple[int, str]]]:
    """The entry's ``(format, rows, notes)``.

    Raises:
        ValueError: an entry for another key or version, or whose tensors do not match their
            digest or each other (and whatever safetensors raises on a damaged file).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if metadata.get("key") != key or metadata.get("version") != str(CACHE_VERSION):
        raise ValueError("it was written for other data or another version")
    if metadata.get("payload_sha256") != _payload_digest(tensors):
        raise ValueError("its contents do not match their digest")
    offsets = tensors["offsets"].tolist()
    ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    tasks, starts = tensors["task"].tolist(), tensors["completion_start"].tolist()
    if offsets[-1] != len(ids) or len(labels) != len(ids) or len(tasks) != len(offsets) - 1:
        raise ValueError("its tensors do not fit together")
    rows = [
        TokenizedRow(ids[a:b], labels[a:b], task, completion_start=start)
        for a, b, task, start in zip(offsets[:-1], offsets[1:], tasks, starts, strict=True)
    ]
    notes = [(int(level), str(text)) for level, text in json.loads(metadata["notes"])]
    return metadata["format"], rows, notes


def _touch(path: Path) -> None:
    """Mark an entry used now (its modification time orders the LRU drop)."""
    with suppress(OSError):
        os.utime(path)


def _prune(folder: Path) -> None:
    """Drop the least recently used entries beyond ``MAX_ENTRIES``."""
    try:
        entries = [(p.stat().st_mtime_ns, p) for p in folder.glob(f"*{SUFFIX}")]
        for _, old in sorted(entries)[: max(0, len(entries) - MAX_ENTRIES)]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
