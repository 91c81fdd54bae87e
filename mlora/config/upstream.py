"""Upstream m-LoRA config files as they are: their key names and values mapped onto mlora's.

TUDB-Labs/mLoRA (2023-2024 JSON configs) and mikecovlee/mLoRA (configs and launcher templates)
use a few keys and values that mlora spells differently or does not need. Each one is either
mapped here (with a note where the meaning differs) or refused with one line that says what to
use instead, so that an upstream file runs unchanged or fails naming the one key at fault. The
table of upstream files and outcomes is in README "Upstream m-LoRA files" and is asserted by
``tests/test_upstream_files.py``.
"""

from __future__ import annotations

import copy
from typing import Any

from mlora.core.errors import ConfigError

# upstream adapter key -> mlora key (same meaning)
RENAMED_KEYS = {
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "test_batch_size": "evaluate_batch_size",  # upstream: rows per evaluation batch
}
# upstream's own projection names -> the transformers module names mlora matches: LLaMA's
# (Meta's w1/w2/w3) and ChatGLM's (qkv, mlp_in, mlp_out; its "dense" is already the module name)
TARGET_MODULE_NAMES = {
    "w1_proj": "gate_proj",
    "w2_proj": "down_proj",
    "w3_proj": "up_proj",
    "qkv": "query_key_value",
    "mlp_in": "dense_h_to_4h",
    "mlp_out": "dense_4h_to_h",
}
ROUTING_STRATEGIES = {"mixtral": "mixlora", "switch": "mixlora-switch"}
_PADDING_SIDE = (
    "mlora packs rows or pads them itself; padding is masked, so its side does not change "
    "the result"
)
# keys read and dropped, with why the run is the same without them
IGNORED_KEYS = {
    "pad_token_id": "mlora pads with the tokenizer's pad id (else EOS) and masks padding",
    "expand_right": _PADDING_SIDE,
    "expand_side": _PADDING_SIDE,
    "early_stop_test_step": "upstream never read it either; mlora does not evaluate during "
    "training (run `launch.py evaluate` / `mlora.py --evaluate` afterwards)",
}
REFUSED_KEYS = {
    "sparse_step": "upstream's MixLoRA experts on every N-th decoder layer only; mlora puts "
    "experts on every decoder layer: remove the key",
}
# keys inside expert_lora that must equal the adapter's own (mlora's experts follow them)
EXPERT_SHARED_KEYS = {"use_dora": False, "lora_init": "original"}


def _rename(item: dict[str, Any], old: str, new: str, where: str) -> None:
    if old not in item:
        return
    if new in item:
        raise ConfigError(f"{where}: keys {old!r} and {new!r} are both set (keep {new!r})")
    item[new] = item.pop(old)


def translate_top(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Run-wide upstream keys: ``group_by_length`` moves into each adapter, ignored keys go.

    Returns:
        A translated copy and the notes to log.

    Raises:
        ConfigError: ``train_strategy: "pipe"`` (upstream's multi-GPU pipeline).
    """
    raw = dict(raw)
    notes = []
    if raw.get("train_strategy") == "pipe":
        raise ConfigError(
            f"{source}: key 'train_strategy' 'pipe' (upstream's pipeline parallelism across "
            "GPUs) is not supported: use 'optim' (or 'none'), which trains on one device"
        )
    if "group_by_length" in raw and isinstance(raw.get("lora"), list):
        value = raw.pop("group_by_length")
        raw["lora"] = [
            {"group_by_length": value, **a} if isinstance(a, dict) else a for a in raw["lora"]
        ]
    for key, why in IGNORED_KEYS.items():
        if key in raw:
            del raw[key]
            notes.append(f"{source}: upstream key {key!r} ignored: {why}")
    return raw, notes


def translate_adapter(
    item: dict[str, Any], where: str, source: str
) -> tuple[dict[str, Any], list[str]]:
    """One adapter object's upstream keys and values mapped onto mlora's.

    Args:
        where: how errors name the adapter (``FILE: adapter 'NAME'``).
        source: how notes name the file (a note is said once per file, not per adapter).

    Returns:
        A translated copy and the notes to log.

    Raises:
        ConfigError: a key mlora cannot honour, naming what to use instead.
    """
    item = copy.deepcopy(item)
    notes = []
    for old, new in RENAMED_KEYS.items():
        _rename(item, old, new, where)
    for key, why in REFUSED_KEYS.items():
        if key in item:
            raise ConfigError(f"{where}: key {key!r} is not supported ({why})")
    for key, why in IGNORED_KEYS.items():
        if key in item:
            del item[key]
            notes.append(f"{source}: upstream key {key!r} ignored: {why}")
    if item.get("task_name") == "":  # upstream's launcher writes "" for causal LM
        item["task_name"] = "casual"
    if "output" in item:
        output = item.pop("output")
        if output != item.get("name"):
            raise ConfigError(
                f"{where}: key 'output' ({output!r}) differs from the adapter name: mlora "
                "writes adapter NAME to DIR/NAME (--dir DIR); rename the adapter or drop 'output'"
            )
    if "target_modules" in item:
        item["target_modules"] = _target_modules(item["target_modules"], where)
    strategy = item.get("routing_strategy")
    if isinstance(strategy, str) and strategy in ROUTING_STRATEGIES:
        item["routing_strategy"] = ROUTING_STRATEGIES[strategy]
    if isinstance(item.get("expert_lora"), dict):
        item["expert_lora"] = _expert_lora(item["expert_lora"], item, where)
    return item, notes


def _target_modules(value: Any, where: str) -> Any:
    """``w1_proj``/``w2_proj``/``w3_proj`` renamed, in a list or a {name: bool} mapping."""
    if isinstance(value, list):
        return [TARGET_MODULE_NAMES.get(m, m) if isinstance(m, str) else m for m in value]
    if not isinstance(value, dict):
        return value
    renamed: dict[str, Any] = {}
    for name, on in value.items():
        new = TARGET_MODULE_NAMES.get(name, name)
        if new in renamed and renamed[new] != on:
            raise ConfigError(
                f"{where}: key 'target_modules' sets {new!r} and its upstream name "
                f"{name!r} differently (keep {new!r})"
            )
        renamed[new] = on
    return renamed


def _expert_lora(value: dict[str, Any], adapter: dict[str, Any], where: str) -> dict[str, Any]:
    """Upstream's expert_lora takes any LoRA key: aliases renamed; keys the experts share with
    the adapter in mlora are accepted when equal to the adapter's and refused otherwise."""
    value = dict(value)
    inner = f"{where}: key 'expert_lora'"
    for old, new in RENAMED_KEYS.items():
        _rename(value, old, new, inner)
    value.pop("target_modules", None)  # upstream's experts sit on the FFN targets too
    for key, default in EXPERT_SHARED_KEYS.items():
        if key in value and value[key] != adapter.get(key, default):
            raise ConfigError(
                f"{inner}: {key!r} differs from the adapter's; mlora's experts follow the "
                f"adapter's {key!r}: set it on the adapter"
            )
        value.pop(key, None)
    return value
