"""Adapter names: each becomes a folder ``DIR/NAME`` and a module key, so it must work as both
on every platform (checked when the config is read, long before the model loads)."""

from __future__ import annotations

import unicodedata
from typing import Any

ADAPTER_NAME_MAX = 64
# Characters Windows refuses in a file name, and '.', which torch refuses in a module key.
_NAME_FORBIDDEN = set('<>:"/\\|?*.')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)
}


def adapter_name_problem(v: Any) -> str | None:
    """Why ``v`` cannot name an adapter, or None.

    The name becomes the folder ``DIR/NAME`` on every platform and a key of the ``ModuleDict``
    that holds the adapter in each layer, so it must be both: at most 64 characters, no
    control characters, none of ``< > : " / \\ | ? *`` or ``.``, no leading/trailing space, not
    a Windows device name (CON, NUL, COM1, ...), and not an attribute of ``nn.ModuleDict``.
    """
    if not isinstance(v, str) or not v:
        return "a non-empty string"
    if len(v) > ADAPTER_NAME_MAX:
        return f"at most {ADAPTER_NAME_MAX} characters long (it is {len(v)})"
    bad = sorted({c for c in v if c in _NAME_FORBIDDEN or not c.isprintable()})
    if bad:
        return f"without {', '.join(repr(c) for c in bad)}"
    if v != v.strip():
        return "without leading or trailing spaces"
    if v.upper() in _WINDOWS_RESERVED:
        return f"not a name Windows reserves for a device ({v.upper()})"
    import torch

    if hasattr(torch.nn.ModuleDict(), v):
        return f"not {v!r}, which torch modules use for an attribute"
    return None


def folder_key(name: str) -> str:
    """The folder ``name`` becomes on the strictest common file system: macOS folds case and
    Unicode normalization (``é`` typed as one code point or as ``e`` + accent), Windows folds
    case. Two names with one key share one folder there (Unicode's canonical caseless match:
    NFD(casefold(NFD(name))))."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def folder_clash(name: str, earlier: dict[str, str]) -> str | None:
    """The earlier name whose folder ``name`` would share on macOS or Windows, or None.

    Args:
        earlier: folder key -> name of the names seen so far; ``name`` is added to it.
    """
    key = folder_key(name)
    if key in earlier:
        return earlier[key]
    earlier[key] = name
    return None


def shown_names(first: str, second: str) -> tuple[str, str]:
    """Two names as a message shows them: quoted, with code points escaped when they look
    alike (``'caf\\xe9'`` and ``'cafe\\u0301'`` both print as café)."""
    if unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", second):
        return ascii(first), ascii(second)
    return repr(first), repr(second)
