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
# The attributes of an ``nn.ModuleDict`` (``dir(torch.nn.ModuleDict())`` on torch 2.13), which
# ``add_module`` refuses as keys. Written out so that reading a config never imports torch;
# tests/test_config.py checks it covers the installed torch's list. ``smart_apply``: transformers
# adds it to every ``nn.Module`` when its modeling code loads.
MODULE_DICT_ATTRIBUTES = frozenset(
    """
    T_destination __annotations__ __call__ __class__ __contains__ __delattr__ __delitem__
    __dict__ __dir__ __doc__ __eq__ __format__ __ge__ __getattr__ __getattribute__ __getitem__
    __getstate__ __gt__ __hash__ __init__ __init_subclass__ __iter__ __le__ __len__ __lt__
    __module__ __ne__ __new__ __reduce__ __reduce_ex__ __repr__ __setattr__ __setitem__
    __setstate__ __sizeof__ __str__ __subclasshook__ __weakref__ _apply _backward_hooks
    _backward_pre_hooks _buffers _call_impl _compiled_call_impl _forward_hooks
    _forward_hooks_always_called _forward_hooks_with_kwargs _forward_pre_hooks
    _forward_pre_hooks_with_kwargs _get_backward_hooks _get_backward_pre_hooks _get_name
    _is_full_backward_hook _load_from_state_dict _load_state_dict_post_hooks
    _load_state_dict_pre_hooks _maybe_warn_non_full_backward_hook _modules _named_members
    _non_persistent_buffers_set _parameters _register_load_state_dict_pre_hook
    _register_state_dict_hook _replicate_for_data_parallel _save_to_state_dict _slow_forward
    _state_dict_hooks _state_dict_pre_hooks _version _wrapped_call_impl add_module apply
    bfloat16 buffers call_super_init children clear compile cpu cuda double dump_patches eval
    extra_repr float forward get_buffer get_extra_state get_parameter get_submodule half ipu
    items keys load_state_dict modules mtia named_buffers named_children named_modules
    named_parameters parameters pop register_backward_hook register_buffer register_forward_hook
    register_forward_pre_hook register_full_backward_hook register_full_backward_pre_hook
    register_load_state_dict_post_hook register_load_state_dict_pre_hook register_module
    register_parameter register_state_dict_post_hook register_state_dict_pre_hook requires_grad_
    set_extra_state set_submodule share_memory smart_apply state_dict to to_empty train training
    type update values xpu zero_grad
    """.split()  # noqa: SIM905 (one word per attribute, wrapped)
)


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
    if v in MODULE_DICT_ATTRIBUTES:
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
