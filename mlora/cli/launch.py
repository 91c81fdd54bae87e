"""``launch.py`` / ``mlora-launch``: write a config from a template, then run it.

Verbs (each a plain function; ``main`` only parses and dispatches):

- ``gen``: one adapter per task, from ``mlora/adapters/KIND/templates/NAME.json`` (or
  ``./templates``), validated before it is written.
- ``run``: calls ``mlora.cli.train.main`` in the same process (no shelling out); without
  ``--base_model`` it trains on the built-in random-weight demo model. With
  ``--nproc_per_node N`` (N > 1) it starts ``torchrun`` (``torch.distributed.run``) with N
  processes of ``mlora.cli.train`` on this machine instead: data parallel training.
- ``avail``: the templates, prompt templates, task types and bundled data sets.
- ``help``: the overview, or one verb's help.

A template is an ordinary config with one adapter object: ``gen`` copies its top-level keys,
fills that adapter's ``name`` and ``data`` once per task and applies the command-line overrides,
so adding a template (e.g. MixLoRA) is adding a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlora.cli.plot import add_plot_verb
from mlora.cli.sweep_config import add_sweep_parser
from mlora.config.schema import (
    CHOICE_TASK_NAMES,
    MOE_STRATEGY_DEFAULTS,
    AdapterConfig,
    TrainConfig,
    describe_keys,
    load_config,
    parse_config,
    read_config_json,
)
from mlora.core.errors import ConfigError, MloraError, exit_code_of

DEFAULT_CONFIG = "mlora.json"
# Data files look like paths; anything else in --tasks is a hub dataset name.
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# What a template cannot say in its own keys (templates stay valid configs, no comment keys).
TEMPLATE_NOTES = {
    "qlora": "meant for a 4-bit base model: run it with `launch.py run --quantize 4bit`",
    "chat": "conversations through the base model's chat template: run it with a chat model, "
    "e.g. `launch.py run --base_model smollm2`",
    "dpo": "preference pairs (prompt/chosen/rejected); the reference is the base itself",
}
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding mlora/

logger = logging.getLogger("mlora")


# --- templates ---------------------------------------------------------------------------------


def template_dirs() -> list[Path]:
    """Where templates are looked up: ``./templates`` (the user's own), then each adapter kind's
    (``mlora/adapters/KIND/templates``, package data: a wheel install has them too). The kind
    folders are found on disk, not imported, so ``gen`` loads no torch."""
    kinds = Path(__file__).resolve().parents[1] / "adapters"
    dirs = [Path.cwd() / "templates", *sorted(kinds.glob("*/templates"))]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available_templates() -> dict[str, Path]:
    """Template name -> file; an earlier folder wins on a name clash."""
    found: dict[str, Path] = {}
    for folder in template_dirs():
        for path in sorted(folder.glob("*.json")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def read_template(
    name: str, templates: dict[str, Path] | None = None
) -> tuple[dict[str, Any], TrainConfig, Path]:
    """Load a template by name (or a path to a JSON file) and check it is a valid config.

    Returns its raw JSON (what ``gen`` copies), the parsed config (what ``avail`` describes)
    and its file, reading the file once.

    Args:
        templates: ``available_templates()`` when the caller already has it (``avail``).

    Raises:
        ConfigError: unknown template, invalid JSON, not exactly one adapter, or an invalid key.
    """
    if templates is None:
        templates = available_templates()
    path = templates.get(name)
    if path is None:
        candidate = Path(name)
        if candidate.suffix == ".json" and candidate.is_file():
            path = candidate
        else:
            known = ", ".join(templates) or "none found"
            raise ConfigError(f"unknown template {name!r} (available: {known})")
    raw = read_config_json(path)
    # a broken template is reported as such, not as a broken config later
    config = parse_config(_with_task_placeholder(raw), source=str(path))
    if len(raw["lora"]) != 1:
        raise ConfigError(f"{path}: a template must hold exactly one adapter object")
    return raw, config, path


def _with_task_placeholder(raw: Any) -> Any:
    """A template as checked: ``gen`` fills each adapter's ``data`` from ``--tasks``, so a
    template need not set it (upstream's launcher templates do not)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("lora"), list):
        return raw
    lora = [{"data": "<--tasks>", **a} if isinstance(a, dict) else a for a in raw["lora"]]
    return {**raw, "lora": lora}


def describe_template(adapter: AdapterConfig) -> str:
    """A one-line summary read from the template adapter's own keys."""
    if adapter.routing_strategy == "meteora":  # the LoRA shape comes from its adapters
        return f"meteora gate over {len(adapter.adapters or ())} adapters, lr={adapter.lr:g}"
    parts = [f"r={adapter.r} alpha={adapter.lora_alpha:g}", f"lr={adapter.lr:g}"]
    if adapter.use_dora:
        parts.append("DoRA")
    if adapter.use_rslora:
        parts.append("rsLoRA")
    if adapter.loraplus_lr_ratio:
        parts.append(f"LoRA+ ratio {adapter.loraplus_lr_ratio:g}")
    if adapter.routing_strategy:  # mixture of LoRA experts
        moe = f"{adapter.routing_strategy} {adapter.num_experts} experts"
        if "top_k" in MOE_STRATEGY_DEFAULTS[adapter.routing_strategy]:
            moe += f" top-{adapter.moe('top_k')}"
        parts.append(moe)
    parts.append("on " + ",".join(adapter.target_module_names))
    return ", ".join(parts)


# --- gen ---------------------------------------------------------------------------------------

# gen flag -> (config key, where it goes: "top" level or each new "adapter")
GEN_OVERRIDES: dict[str, tuple[str, str]] = {
    "prompt_template": ("prompt", "adapter"),
    "cutoff_len": ("cutoff_len", "top"),
    "save_step": ("save_step", "top"),
    "lr_scheduler": ("scheduler_type", "adapter"),
    "warmup_steps": ("warmup_steps", "adapter"),
    "learning_rate": ("lr", "adapter"),
    "batch_size": ("batch_size", "adapter"),
    "micro_batch_size": ("micro_batch_size", "adapter"),
    "num_epochs": ("num_epochs", "adapter"),
    "loraplus_lr_ratio": ("loraplus_lr_ratio", "adapter"),
    "use_dora": ("use_dora", "adapter"),
    "use_rslora": ("use_rslora", "adapter"),
    "group_by_length": ("group_by_length", "adapter"),
}


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(";") if item.strip()]


def check_task(task: str) -> None:
    """A task that looks like a file must exist; any other name is left to the hub at run time.

    Raises:
        ConfigError: a data file that does not exist.
    """
    path = Path(task)
    looks_local = path.suffix.lower() in DATA_SUFFIXES or task.startswith((".", "/", "~"))
    if looks_local and not path.expanduser().is_file():
        raise ConfigError(f"data file not found: {task}")


def adapter_names(adapter_name: str | None, prefix: str, count: int, taken: set[str]) -> list[str]:
    """Names for ``count`` new adapters.

    ``--adapter_name "a;b"`` gives one name per task; a single name with a single task is used
    as it is; otherwise it (or the template name) is a prefix: ``PREFIX_0``, ``PREFIX_1``, ...
    skipping names the config already has.

    Raises:
        ConfigError: a name count that differs from the task count, or a name already taken.
    """
    if adapter_name and (";" in adapter_name or count == 1):
        names = split_list(adapter_name)
        if len(names) != count:
            raise ConfigError(
                f"--adapter_name gives {len(names)} names for {count} tasks "
                "(use one name per task, or one prefix)"
            )
        for name in names:
            if name in taken:
                raise ConfigError(f"adapter name {name!r} is already in the config")
        return names
    base = adapter_name or prefix
    names, index = [], 0
    while len(names) < count:
        name = f"{base}_{index}"
        if name not in taken:
            names.append(name)
        index += 1
    return names


def split_test_data(test_data: str | None, count: int) -> list[str | None]:
    """``--test_data``: one file for every task, or ``;``-separated, one per task.

    Raises:
        ConfigError: a count that differs from the task count, or a missing file.
    """
    if test_data is None:
        return [None] * count
    files = split_list(test_data)
    if len(files) == 1:
        files *= count
    if len(files) != count:
        raise ConfigError(
            f"--test_data gives {len(files)} files for {count} tasks (use one, or one per task)"
        )
    for path in files:
        check_task(path)
    return list(files)


def build_config(
    args: argparse.Namespace,
    template: dict[str, Any],
    template_name: str,
    existing: dict[str, Any] | None,
) -> dict[str, Any]:
    """The config ``gen`` writes: the template (or ``existing``) plus one adapter per task.

    Raises:
        ConfigError: missing data file, bad names or an invalid value.
    """
    tasks = split_list(args.tasks)
    if not tasks:
        raise ConfigError("--tasks is empty: give data files or task names separated by ';'")
    for task in tasks:
        check_task(task)
    config = copy.deepcopy(existing) if existing is not None else copy.deepcopy(template)
    if existing is None:
        config["lora"] = []
    taken = {a["name"] for a in config["lora"]}
    adapter_template = template["lora"][0]
    names = adapter_names(args.adapter_name, template_name, len(tasks), taken)
    test_data = split_test_data(args.test_data, len(tasks))
    for name, task, test in zip(names, tasks, test_data, strict=True):
        adapter = copy.deepcopy(adapter_template)
        adapter.update(name=name, data=task)
        if test is not None:
            adapter["test_data"] = test
        if task in CHOICE_TASK_NAMES:  # a built-in choice task: train and evaluate it as one
            adapter["task_name"] = task
        for flag, (key, level) in GEN_OVERRIDES.items():
            value = getattr(args, flag)
            if value is None or value is False:
                continue
            (config if level == "top" else adapter)[key] = value
        if args.batch_size is not None and args.micro_batch_size is None:
            micro = adapter.get("micro_batch_size")
            if micro is not None and args.batch_size % micro:
                adapter["micro_batch_size"] = args.batch_size  # the template's no longer divides
        config["lora"].append(adapter)
    parse_config(config, source=args.file_name)  # never write a config mlora.py would reject
    return config


def cmd_gen(args: argparse.Namespace) -> int:
    """Write (or extend, with ``--append``) a config file from a template."""
    from mlora.core.atomic import atomic_write_text

    template, _, template_path = read_template(args.template)
    target = Path(args.file_name)
    existing = None
    if target.exists():
        if args.append:
            existing = read_config_json(target)
            parse_config(existing, source=str(target))  # refuse to extend a broken config
        elif not args.overwrite:
            raise MloraError(
                f"{target} already exists; pass --append to add adapters or --overwrite to replace"
            )
    config = build_config(args, template, template_path.stem, existing)
    atomic_write_text(target, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    added = config["lora"][len(existing["lora"]) if existing else 0 :]
    verb = "added to" if existing else "wrote"
    print(f"{verb} {target}: {len(added)} adapter(s) from template {template_path.stem}")
    for adapter in added:
        kind = "" if Path(adapter["data"]).is_file() else " (not a local file: a hub dataset name)"
        if adapter.get("task_name") not in (None, "", "casual"):  # "": upstream's casual
            kind = (
                f" (built-in choice task {adapter['task_name']}: hub data, or a local file later)"
            )
        print(f"  {adapter['name']}: {adapter['data']}{kind}")
    note = TEMPLATE_NOTES.get(template_path.stem)
    if note:
        print(f"note: {template_path.stem} is {note}")
    config_flag = "" if target == Path(DEFAULT_CONFIG) else f" --config {target}"
    command = _command_name()
    print(f"next: {command} run{config_flag} --dir out  (adapters go to out/NAME)")
    print(
        "      add --base_model MODEL (a folder, a hub id, a .gguf file, or smollm2) to train "
        "a real model; without it run uses the built-in demo model (random weights)"
    )
    if any("test_data" in adapter for adapter in added):
        print(f"then: {command} evaluate{config_flag} --dir out")
    return 0


def _command_name() -> str:
    """How the user invoked us, for the hints we print."""
    name = _program_name()
    return f"python {name}" if name.endswith(".py") else name


def _program_name() -> str:
    from mlora.cli.program import program_name

    return program_name("launch.py", "mlora-launch", "mlora.cli.launch")


# --- run ---------------------------------------------------------------------------------------

# launch.py run option -> (value, the mlora.py flags it becomes)
RUN_FLAG_MAP: dict[str, Callable[[Any], list[str]]] = {
    "config": lambda v: ["--config", v],
    "dir": lambda v: ["--dir", v],
    "seed": lambda v: ["--seed", str(v)],
    "device": lambda v: ["--device", v],
    "load_adapter": lambda v: ["--load_adapter"] if v else [],
    "overwrite": lambda v: ["--overwrite"] if v else [],
    "tf32": lambda v: ["--tf32"] if v else [],
    "dtype": lambda v: {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}[v],
    "quantize": lambda v: [f"--load_{v}"],
    "attn_impl": lambda v: ["--attn_impl", v],
    "resume": lambda v: ["--resume"] if v else [],
    "trust_remote_code": lambda v: ["--trust_remote_code"] if v else [],
    "gguf_file": lambda v: ["--gguf_file", v],
    "dist_backend": lambda v: ["--dist_backend", v],
    "fsdp": lambda v: ["--fsdp"] if v else [],
    "report_to": lambda v: ["--report_to", *v],
}


def mlora_argv(args: argparse.Namespace) -> list[str]:
    """The ``mlora.py`` flags equivalent to a ``launch.py run`` command line (but the model).

    An option the verb's parser lacks (``evaluate`` has no ``--seed``) counts as unset. Every
    flag produced exists in ``mlora.cli.train`` (both ship in this package), so none is re-checked.
    """
    argv: list[str] = []
    for option, to_flags in RUN_FLAG_MAP.items():
        value = getattr(args, option, None)
        if value is None or value is False:
            continue
        argv += to_flags(value)
    return argv


def _call_mlora(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    """``mlora.cli.train.main`` in this process on ``args`` plus ``extra`` flags; its exit code.

    Shared by ``run`` and ``evaluate``: the config is checked before any model is generated or
    loaded, and without ``--base_model`` the demo model is used.
    """
    from mlora.cli import train as cli

    load_config(args.config)  # fail before generating or loading any model
    argv = [*mlora_argv(args), *extra]
    base_model = args.base_model
    if base_model is None:
        from mlora.model.demo_model import demo_model_path

        cli.setup_logging(verbose=False, log_file=None)
        base_model = str(demo_model_path())
    nproc = getattr(args, "nproc_per_node", None) or 1
    if nproc < 1:
        raise MloraError(f"--nproc_per_node must be at least 1, got {nproc}")
    if nproc > 1:
        return run_torchrun(nproc, ["--base_model", base_model, *argv])
    return cli.main(["--base_model", base_model, *argv])


def torchrun_command(nproc: int, mlora_flags: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m mlora.cli.train FLAGS``:
    one machine, N processes, a free rendezvous port chosen by torchrun."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "-m", "mlora.cli.train", *mlora_flags,
    ]  # fmt: skip


def run_torchrun(nproc: int, mlora_flags: Sequence[str]) -> int:
    """Start torchrun on this mlora package (PYTHONPATH points at it); its exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(torchrun_command(nproc, mlora_flags), env=env).returncode


def cmd_run(args: argparse.Namespace) -> int:
    """Train the config via ``mlora.cli.train.main`` (in this process, or under torchrun with
    ``--nproc_per_node`` > 1); its exit code is returned."""
    return _call_mlora(args)


# --- evaluate ----------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate trained adapters in this process via ``mlora.cli.train.main --evaluate``."""
    from mlora.cli.harness_options import check_harness_options, harness_flags

    check_harness_options(args)
    adapters = ["--adapters", args.adapters] if args.adapters else []
    return _call_mlora(args, ["--evaluate", *adapters, *harness_flags(args)])


# --- avail / help ------------------------------------------------------------------------------


def bundled_data() -> list[Path]:
    folder = PACKAGE_ROOT / "data"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def cmd_avail(args: argparse.Namespace) -> int:
    """List the templates, prompt templates, task types and bundled data sets."""
    from mlora.data.prompts import BUILTIN_TEMPLATES

    print("templates (launch.py gen --template NAME):")
    templates = available_templates()
    for name in templates:
        try:
            _, config, _ = read_template(name, templates)
            summary = describe_template(config.lora[0])
        except MloraError as exc:
            summary = f"INVALID: {exc}"
        note = f"; {TEMPLATE_NOTES[name]}" if name in TEMPLATE_NOTES else ""
        print(f"  {name:<18} {summary}{note}")
    print("prompt templates (--prompt_template NAME, or a template JSON file):")
    for name, template in BUILTIN_TEMPLATES.items():
        print(f"  {name:<18} {template.get('description', '')}")
    task_help = {key: text for key, _, text in describe_keys(AdapterConfig)}["task_name"]
    print(f"task types (key task_name): {task_help}")
    data = bundled_data()
    if data:
        print("bundled data sets (launch.py gen --tasks PATH):")
        for path in data:
            rows = len(json.loads(path.read_text(encoding="utf-8")))
            print(f"  {_display(path):<30} {rows} rows")
    print("tasks may also be local .json/.jsonl/.csv/.parquet files or hub dataset names")
    return 0


def _display(path: Path) -> str:
    try:
        return "./" + str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_help(args: argparse.Namespace) -> int:
    """``help`` prints the overview; ``help VERB`` prints that verb's options."""
    if args.verb:
        return main([args.verb, "--help"])
    build_parser().print_help()
    return 0


# --- parser ------------------------------------------------------------------------------------


def _add_gen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gen",
        help="write a config from a template, one adapter per task",
        description="Write a config from a template (mlora/adapters/KIND/templates/NAME.json, "
        "./templates/NAME.json or a .json file) with one adapter per task; it is "
        "validated before it is written. Unset options keep the template's values.",
    )
    p.add_argument("--template", required=True, help="template name (see `avail`) or a .json file")
    p.add_argument("--tasks", required=True, help="';'-separated data files or hub dataset names")
    p.add_argument(
        "--test_data",
        help="evaluation data for `evaluate` (key test_data): one file for every task, or "
        "';'-separated, one per task",
    )
    p.add_argument(
        "--adapter_name",
        help="';'-separated names (one per task), or a prefix for NAME_0, NAME_1, ... "
        "(default prefix: the template name)",
    )
    p.add_argument("--file_name", default=DEFAULT_CONFIG, help="config to write (%(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add adapters to an existing config")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing config")
    p.add_argument("--prompt_template", help="prompt template name or JSON file (key prompt)")
    p.add_argument("--cutoff_len", type=int, help="max tokens per row (key cutoff_len)")
    p.add_argument("--save_step", type=int, help="checkpoint every N steps (key save_step)")
    p.add_argument("--lr_scheduler", help="scheduler name, e.g. cosine (key scheduler_type)")
    p.add_argument("--warmup_steps", type=int, help="warm-up steps (key warmup_steps)")
    p.add_argument("--learning_rate", type=float, help="learning rate (key lr)")
    p.add_argument("--batch_size", type=int, help="rows per optimizer step (key batch_size)")
    p.add_argument("--micro_batch_size", type=int, help="rows per forward (key micro_batch_size)")
    p.add_argument("--num_epochs", type=int, help="passes over the data (key num_epochs)")
    p.add_argument("--loraplus_lr_ratio", type=float, help="LoRA+ lr ratio of lora_B")
    p.add_argument("--use_dora", action="store_true", help="turn DoRA on")
    p.add_argument("--use_rslora", action="store_true", help="turn rsLoRA on")
    p.add_argument("--group_by_length", action="store_true", help="order rows by length")
    p.set_defaults(func=cmd_gen)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="train a config (in this process, through mlora.py)",
        description="Train every adapter of a config. Without --base_model it uses the built-in "
        "random-weight demo model (a tiny LLaMA for trying mlora offline, not a real LLM), "
        "cached in $MLORA_HOME/demo-model (default ~/.cache/mlora/demo-model).",
    )
    _add_model_args(p, dir_help="output folder; adapter NAME goes to DIR/NAME (default .)")
    p.add_argument("--load_adapter", action="store_true", help="continue from DIR/NAME")
    p.add_argument("--overwrite", action="store_true", help="allow replacing DIR/NAME")
    p.add_argument("--seed", type=int, help="seed for data order and adapter init")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA)")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoints")
    p.add_argument(
        "--nproc_per_node",
        type=int,
        default=None,
        help="data parallel: start torchrun with this many processes on this machine (one per "
        "GPU; on CPU each process takes a share of the cores); multi-node: see README",
    )
    p.add_argument(
        "--dist_backend",
        choices=("nccl", "gloo"),
        help="torch.distributed backend with --nproc_per_node (default: nccl on CUDA, else gloo)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with --nproc_per_node: shard the frozen base over the processes (FSDP2)",
    )
    p.add_argument(
        "--report_to",
        nargs="+",
        metavar="TRACKER",
        help="trackers that also get the metrics: tensorboard, mlflow, trackio, wandb or none",
    )
    p.set_defaults(func=cmd_run)


def _add_model_args(p: argparse.ArgumentParser, dir_help: str) -> None:
    """What ``run`` and ``evaluate`` share: the config, the folder, and how the base loads."""
    p.add_argument(
        "--base_model",
        help="local model folder, hub id, GGUF file or 'smollm2' (default: demo model)",
    )
    p.add_argument("--gguf_file", help="a GGUF file inside the --base_model folder")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (%(default)s)")
    p.add_argument("--dir", help=dir_help)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="base model dtype (fp32)")
    p.add_argument("--quantize", choices=("4bit", "8bit"), help="load the base model quantized")
    p.add_argument(
        "--attn_impl",
        choices=("eager", "sdpa", "flash_attn"),
        help="attention kernel (default: flash_attn on CUDA when installed, else sdpa)",
    )
    p.add_argument(
        "--trust_remote_code", action="store_true", help="allow the model's own code (off)"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate the trained adapters of a config (in this process, through mlora.py)",
        description="Evaluate the trained adapters DIR/NAME of a config on their test data "
        "(loss, perplexity, exact match; accuracy for choice tasks) and write evaluate_result "
        "(default DIR/evaluate_result.json). Without --base_model it uses the built-in demo model.",
    )
    _add_model_args(p, dir_help="where the trained adapters are: DIR/NAME (default .)")
    p.add_argument("--adapters", help="comma-separated adapter names (default: all with test data)")
    from mlora.cli.harness_options import add_harness_options

    add_harness_options(p)
    p.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="Write mlora configs from templates and run them.",
        epilog="Quickstart: launch.py gen --template lora --tasks ./data/dummy_data.json; "
        "launch.py run --dir out",
    )
    sub = parser.add_subparsers(dest="command", metavar="VERB", required=True)
    _add_gen(sub)
    _add_run(sub)
    _add_evaluate(sub)
    add_plot_verb(sub)
    add_sweep_parser(sub, read_template)
    avail = sub.add_parser("avail", help="list templates, prompt templates and bundled data")
    avail.set_defaults(func=cmd_avail)
    help_ = sub.add_parser("help", help="show this help, or one verb's help")
    verbs = ("gen", "run", "evaluate", "plot", "sweep", "avail", "help")
    help_.add_argument("verb", nargs="?", choices=verbs)
    help_.set_defaults(func=cmd_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, printed as one line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2) end here
        return exc.code if isinstance(exc.code, int) else 2
    return exit_code_of(lambda: args.func(args))


if __name__ == "__main__":  # python -m mlora.cli.launch
    sys.exit(main())
