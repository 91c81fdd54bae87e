"""The ``sweep`` block of a config: a base adapter, a search space over its keys, and how to search.

A sweep config holds run-wide keys and one ``sweep`` object instead of a ``lora`` list::

    {"cutoff_len": 256,
     "sweep": {"name": "lr-rank", "base": {"data": "train.json", "val_set_size": 0.1, ...},
               "search_space": {"lr": {"low": 1e-5, "high": 1e-3, "log": true}, "r": [4, 8, 16]},
               "sampler": "tpe", "trials": 12, "concurrent": 4, "pruner": "median"}}

Every trial is the base adapter with the trial's values put in, validated like any adapter. This
module checks the block's shape only; it imports no schema (``schema.py`` passes the per-key
checks in) and no Optuna (``mlora.sweep.study`` turns the space into Optuna distributions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mlora.core.errors import ConfigError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
SWEEP_KEYS = (
    "name", "base", "search_space", "sampler", "trials", "concurrent", "pruner", "pruner_options",
)  # fmt: skip
# Adapter keys a search space may vary, and the kind of range each takes: "float" and "int"
# keys take a list or a {low, high, log, step} range, "choice" keys a list only.
SEARCHABLE: dict[str, str] = {
    "lr": "float",
    "r": "int",
    "lora_alpha": "float",
    "lora_dropout": "float",
    "target_modules": "choice",
    "use_dora": "choice",
    "use_rslora": "choice",
    "loraplus_lr_ratio": "float",
    "warmup_ratio": "float",
    "scheduler_type": "choice",
    "num_epochs": "int",
    "weight_decay": "float",
    "batch_size": "int",
    "lora_init": "choice",
    "optim": "choice",
    "data": "choice",
}
RANGE_KEYS = ("low", "high", "log", "step")

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class SearchDimension:
    """One searched key: a list of ``choices``, or a numeric range ``[low, high]``.

    Attributes:
        kind: "choice" (``choices``), "float" or "int" (a range, log-scaled with ``log``).
    """

    key: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    @property
    def is_grid(self) -> bool:
        return self.kind == "choice"


@dataclass(frozen=True)
class SweepConfig:
    """A validated ``sweep`` block (``raw``: as written, for the run's identity and resume)."""

    name: str
    base: dict[str, Any]
    space: dict[str, SearchDimension]
    sampler: str
    trials: int
    concurrent: int
    pruner: str
    pruner_options: dict[str, Any]
    raw: dict[str, Any]

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.choices) for d in self.space.values())

    def trial_name(self, number: int) -> str:
        """The adapter name (and folder ``DIR/SWEEP/NAME``) of trial ``number``."""
        return f"trial-{number:03d}"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def _dimension(key: str, value: Any, where: str, check: Check) -> SearchDimension:
    kind = SEARCHABLE[key]
    here = f"{where}: key 'search_space.{key}'"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{here} is an empty list of choices")
        choices = []
        for choice in value:
            if kind == "float" and _int(choice):
                choice = float(choice)
            problem = check(choice)
            if problem:
                raise ConfigError(f"{here}: choice {json.dumps(choice)} must be {problem}")
            if choice in choices:
                raise ConfigError(f"{here}: choice {json.dumps(choice)} is listed twice")
            choices.append(choice)
        return SearchDimension(key, "choice", tuple(choices))
    if kind == "choice" or not isinstance(value, dict):
        shape = "a non-empty list of values" + (
            "" if kind == "choice" else " or a {low, high, log, step} range"
        )
        raise ConfigError(f"{here} must be {shape}, got {json.dumps(value)}")
    unknown = [k for k in value if k not in RANGE_KEYS]
    if unknown:
        raise ConfigError(f"{here}: unknown key {unknown[0]!r} (a range has low, high, log, step)")
    if "low" not in value or "high" not in value:
        raise ConfigError(f"{here}: a range needs both 'low' and 'high'")
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    bound_ok = _int if kind == "int" else _number
    for bound_name, bound in (("low", low), ("high", high)):
        if not bound_ok(bound):
            what = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{here}: '{bound_name}' must be {what}, got {json.dumps(bound)}")
    if not isinstance(log, bool):
        raise ConfigError(f"{here}: 'log' must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{here}: a log range needs 'low' > 0, got {json.dumps(low)}")
    if low >= high:
        raise ConfigError(f"{here}: 'low' ({low}) must be < 'high' ({high})")
    if step is not None and (not bound_ok(step) or step <= 0 or log):
        raise ConfigError(f"{here}: 'step' must be a number > 0, and not with 'log'")
    for bound in (low, high):
        problem = check(float(bound) if kind == "float" else bound)
        if problem:
            raise ConfigError(f"{here}: bound {json.dumps(bound)} must be {problem}")
    return SearchDimension(key, kind, (), float(low), float(high), log, step)


def parse_sweep(
    raw: Any,
    source: str,
    key_checks: Mapping[str, Check],
    build_adapter: Callable[[dict[str, Any], str], Any],
) -> SweepConfig:
    """Validate a ``sweep`` block.

    Args:
        source: the config file (errors name it and the key).
        key_checks: each adapter key's value check (from the schema).
        build_adapter: validates one adapter entry (raising ``ConfigError``); called with the
            base and with the base under each listed choice and range bound.

    Raises:
        ConfigError: one line naming the key: an unknown key, an unsearchable key, an empty
            choice list, a log range with a bound <= 0, ``trials`` or ``concurrent`` < 1, a
            grid over a range, a base without validation data.
    """
    where = f"{source}: sweep"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object")
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(SWEEP_KEYS)})")
    name = raw.get("name", "sweep")
    base = raw.get("base")
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: key 'base' must be an adapter object (data, lr, r, ...)")
    if "name" in base:
        raise ConfigError(f"{where}: key 'base.name' is not used (trials are named trial-NNN)")
    build_adapter({**base, "name": "trial-000"}, f"{where} base")
    if base.get("val_data") is None and base.get("val_set_size") is None:
        raise ConfigError(
            f"{where}: key 'base' needs 'val_data' or 'val_set_size' (the sweep's objective "
            "is the validation loss)"
        )
    space_raw = raw.get("search_space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(f"{where}: key 'search_space' must be a non-empty object of keys")
    space = {}
    for key, value in space_raw.items():
        if key not in SEARCHABLE:
            raise ConfigError(
                f"{where}: unknown key {key!r} in 'search_space' (searchable: "
                f"{', '.join(SEARCHABLE)})"
            )
        space[key] = _dimension(key, value, where, key_checks[key])
        for probe in _probes(space[key]):
            build_adapter({**base, key: probe, "name": "trial-000"}, f"{where} search_space")
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{where}: key 'sampler' must be one of {', '.join(SAMPLERS)}")
    config = _finish(raw, where, name, base, space, sampler)
    return config


def _probes(dim: SearchDimension) -> list[Any]:
    if dim.kind == "choice":
        return list(dim.choices)
    if dim.kind == "int":
        return [int(dim.low), int(dim.high)]
    return [dim.low, dim.high]


def _finish(
    raw: dict[str, Any],
    where: str,
    name: Any,
    base: dict[str, Any],
    space: dict[str, SearchDimension],
    sampler: str,
) -> SweepConfig:
    from mlora.config.adapter_names import adapter_name_problem

    if not isinstance(name, str) or adapter_name_problem(name) is not None:
        raise ConfigError(f"{where}: key 'name' must be a name usable as a folder name")
    ranges = [d.key for d in space.values() if not d.is_grid]
    if sampler == "grid" and ranges:
        raise ConfigError(
            f"{where}: key 'search_space.{ranges[0]}' must be a list of values for sampler 'grid'"
        )
    grid = math.prod(len(d.choices) for d in space.values()) if sampler == "grid" else None
    trials = raw.get("trials", grid)
    if trials is None:
        raise ConfigError(f"{where}: key 'trials' is required with sampler {sampler!r}")
    for key, value in (("trials", trials), ("concurrent", raw.get("concurrent", 4))):
        if not _int(value) or value < 1:
            raise ConfigError(f"{where}: key {key!r} must be an integer >= 1, got {value!r}")
    if grid is not None and trials > grid:
        raise ConfigError(
            f"{where}: key 'trials' ({trials}) is more than the grid's {grid} combinations"
        )
    pruner = raw.get("pruner", "none")
    if pruner not in PRUNERS:
        raise ConfigError(f"{where}: key 'pruner' must be one of {', '.join(PRUNERS)}")
    options = raw.get("pruner_options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: key 'pruner_options' must be an object")
    if options and pruner == "none":
        raise ConfigError(f"{where}: key 'pruner_options' needs a 'pruner'")
    return SweepConfig(
        name=name,
        base=dict(base),
        space=space,
        sampler=sampler,
        trials=trials,
        concurrent=raw.get("concurrent", 4),
        pruner=pruner,
        pruner_options=dict(options),
        raw=json.loads(json.dumps(raw)),
    )
