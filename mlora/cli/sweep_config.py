"""``launch.py sweep``: write a config whose ``sweep`` block searches an adapter's keys.

The base adapter is a template's adapter (``--template``, default ``lora``) with ``--data`` and
the validation keys; each ``--search KEY=VALUES`` adds one key to the search space:

- ``lr=1e-4,3e-4,1e-3``: a list of values (every sampler, and the grid);
- ``lr=1e-5:1e-3:log`` / ``lora_dropout=0:0.1``: a range (``random`` and ``tpe``);
- ``target_modules=q_proj+v_proj,q_proj+k_proj+v_proj+o_proj``: list values joined by ``+``.

The config is validated as ``mlora.py`` reads it before it is written.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlora.config.schema import parse_config
from mlora.config.sweep import PRUNERS, SAMPLERS, SEARCHABLE
from mlora.core.errors import ConfigError, MloraError

DEFAULT_SWEEP_FILE = "sweep.json"
# Flags copied into the base adapter as they are (None: not given).
BASE_FLAGS = ("val_data", "eval_steps", "num_epochs", "batch_size", "early_stopping_patience",
              "early_stopping_threshold", "prompt")  # fmt: skip


def _scalar(text: str) -> Any:
    """``4`` -> 4, ``3e-4`` -> 0.0003, ``true`` -> True, anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _steps(text: str) -> int | list[int]:
    """``--eval_steps``: ``10`` (every 10 steps) or ``2,6,18`` (at those steps)."""
    values = [int(part) for part in text.split(",")]
    return values if "," in text else values[0]


def _json_object(text: str) -> dict[str, Any]:
    """``--pruner_options``: a JSON object (argparse reports anything else as a usage error)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def parse_search(item: str) -> tuple[str, Any]:
    """One ``--search KEY=VALUES`` as ``(key, list or range object)``.

    Raises:
        ConfigError: no ``=``, an unknown key or a malformed range (naming the flag's text).
    """
    key, sep, values = item.partition("=")
    key = key.strip()
    if not sep or not values.strip():
        raise ConfigError(f"--search {item!r}: write KEY=V1,V2,... or KEY=LOW:HIGH[:log]")
    if key not in SEARCHABLE:
        raise ConfigError(f"--search {item!r}: {key!r} is not searchable "
                          f"(searchable: {', '.join(SEARCHABLE)})")  # fmt: skip
    if ":" in values and "," not in values:
        parts = values.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ConfigError(f"--search {item!r}: a range is LOW:HIGH or LOW:HIGH:log")
        return key, {"low": _scalar(parts[0]), "high": _scalar(parts[1]), "log": len(parts) == 3}
    choices = []
    for value in values.split(","):
        value = value.strip()
        if key == "target_modules":
            choices.append([m for m in value.split("+") if m])
        else:
            choices.append(_scalar(value))
    return key, choices


def build_sweep_config(args: argparse.Namespace, template: dict[str, Any]) -> dict[str, Any]:
    """The config ``launch.py sweep`` writes (validated).

    Raises:
        ConfigError: a bad flag or a config ``mlora.py`` would reject.
    """
    if not args.search:
        raise ConfigError("give at least one --search KEY=VALUES (e.g. --search lr=1e-4,3e-4)")
    base = copy.deepcopy(template["lora"][0])
    base.pop("name", None)
    base["data"] = args.data
    for flag in BASE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            base[flag] = value
    if args.val_data is None:
        base["val_set_size"] = args.val_set_size
    if args.save_best:
        base["save_best"] = True
    base.setdefault("eval_steps", 10)
    space = dict(parse_search(item) for item in args.search)
    block: dict[str, Any] = {
        "name": args.name, "base": base, "search_space": space, "sampler": args.sampler,
        "concurrent": args.concurrent, "pruner": args.pruner,
    }  # fmt: skip
    if args.trials is not None:
        block["trials"] = args.trials
    if args.pruner_options is not None:
        block["pruner_options"] = args.pruner_options
    config = {k: v for k, v in template.items() if k != "lora"}
    if args.cutoff_len is not None:
        config["cutoff_len"] = args.cutoff_len
    config["sweep"] = block
    parse_config(config, source=args.file_name)  # never write a config mlora.py would reject
    return config


def cmd_sweep(
    args: argparse.Namespace, read_template: Callable[[str], tuple[dict, Any, Path]]
) -> int:
    """Write the sweep config and say how to run it."""
    from mlora.core.atomic import atomic_write_text

    template, _, template_path = read_template(args.template)
    target = Path(args.file_name)
    if target.exists() and not args.overwrite:
        raise MloraError(f"{target} already exists; pass --overwrite to replace it")
    config = build_sweep_config(args, template)
    atomic_write_text(target, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    block = config["sweep"]
    trials = block.get("trials", "every combination: all")
    print(f"wrote {target}: sweep {block['name']!r} over {', '.join(block['search_space'])} "
          f"({block['sampler']} sampler, {trials} trials, {block['concurrent']} at once, "
          f"pruner {block['pruner']}; base from template {template_path.stem})")  # fmt: skip
    print(f"next: launch.py run --config {target} --dir out  (results in out/{block['name']}/)")
    return 0


def add_sweep_parser(
    sub: argparse._SubParsersAction, read_template: Callable[[str], tuple[dict, Any, Path]]
) -> None:
    p = sub.add_parser(
        "sweep",
        help="write a hyperparameter sweep config (Optuna: grid, random or TPE; pruners)",
        description="Write a config with a sweep block: a template's adapter as the base, "
        "searched over the --search keys, validated on held-out rows. Run it with "
        "`launch.py run --config FILE`; results go to DIR/NAME/.",
    )
    p.add_argument("--data", required=True, help="training data of every trial (key data)")
    p.add_argument("--search", action="append", metavar="KEY=VALUES",
                   help="a searched key: KEY=V1,V2 (list), KEY=LOW:HIGH[:log] (range); "
                   "repeat for more keys")  # fmt: skip
    p.add_argument("--template", default="lora", help="template of the base adapter (lora)")
    p.add_argument("--name", default="sweep", help="sweep name: results in DIR/NAME (sweep)")
    p.add_argument("--val_data", help="validation data (key val_data)")
    p.add_argument("--val_set_size", type=_scalar, default=0.1,
                   help="rows (an integer) or fraction held out of --data (0.1)")  # fmt: skip
    p.add_argument("--eval_steps", type=_steps, metavar="N|S1,S2,...",
                   help="validate every N optimizer steps (10), or at the steps listed "
                   "(e.g. a pruner's rungs 2,6,18)")  # fmt: skip
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (tpe)")
    p.add_argument("--trials", type=int, help="trials to run (grid: every combination)")
    p.add_argument("--concurrent", type=int, default=4, help="trials trained at once (4)")
    p.add_argument("--pruner", choices=PRUNERS, default="none", help="Optuna pruner (none)")
    p.add_argument("--pruner_options", type=_json_object, metavar="JSON",
                   help='the Optuna pruner\'s arguments, e.g. \'{"min_resource": 2}\'')  # fmt: skip
    p.add_argument("--early_stopping_patience", type=int, help="key early_stopping_patience")
    p.add_argument("--early_stopping_threshold", type=float, help="key early_stopping_threshold")
    p.add_argument("--save_best", action="store_true", help="keep each trial's best weights")
    p.add_argument("--num_epochs", type=int, help="epochs of each trial (key num_epochs)")
    p.add_argument("--batch_size", type=int, help="rows per optimizer step (key batch_size)")
    p.add_argument("--prompt", help="prompt template name or JSON file (key prompt)")
    p.add_argument("--cutoff_len", type=int, help="max tokens per row (key cutoff_len)")
    p.add_argument("--file_name", default=DEFAULT_SWEEP_FILE, help="config to write (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing config")
    p.set_defaults(func=lambda args: cmd_sweep(args, read_template))
