"""MeteoRA adapters on disk: the embedded adapters read from PEFT LoRA folders, and a trained
MeteoRA saved as one folder.

Training reads each folder of the config's ``adapters`` (ours or any PEFT LoRA; ranks and
targets may differ) and checks them before the model loads: LoRA (no DoRA, no per-layer rank or
alpha patterns, no regex targets), distinct base names (the task labels), one base shape per
layer across all of them. Their weights are copied into the model once it is built, each tensor
checked against the model's layer.

A trained MeteoRA folder holds ``adapter_config.json`` (``peft_type: "METEORA"``, the routing
keys and each embedded adapter's name, r, lora_alpha, use_rslora and target_modules) and one
``adapter_model.safetensors`` with, for every gated layer at module path ``P``:

    base_model.model.P.gate.weight                              (N, in), the gate
    base_model.model.P.loras.{name}.lora_A.weight / .lora_B.weight   embedded adapter ``name``

Loading it rebuilds the layers from the config and checks every tensor's presence and shape.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlora.adapters.format_tensors import copy_into, lora_tensors
from mlora.adapters.meteora.layer import MeteoraAdapter
from mlora.adapters.meteora.spec import EmbeddedLora, MeteoraSpec
from mlora.adapters.peft_files import (
    LEGACY_WEIGHTS_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    read_adapter,
    read_adapter_config,
)
from mlora.config.schema import AdapterConfig
from mlora.core.errors import MloraError
from mlora.core.integrity import shape_problem

logger = logging.getLogger("mlora")

PEFT_TYPE = "METEORA"


# --- the embedded adapters of a config -----------------------------------------------------------


def embedded_lora(folder: str, where: str) -> EmbeddedLora:
    """The embedded adapter of a PEFT LoRA folder, from its ``adapter_config.json``.

    Raises:
        MloraError: no adapter there, or one MeteoRA cannot embed (naming the folder).
    """
    try:
        config = read_adapter_config(folder)
    except MloraError as exc:
        raise MloraError(f"{where}: key 'adapters': {exc}") from None
    what = f"{where}: key 'adapters': {folder}"
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise MloraError(f"{what} is a {peft_type} adapter; MeteoRA embeds LoRA adapters only")
    if config.get("use_dora"):
        raise MloraError(f"{what} is a DoRA adapter; MeteoRA embeds plain LoRA adapters only")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "target_parameters"):
        if config.get(key):
            raise MloraError(f"{what} sets {key!r}, which MeteoRA does not support")
    targets = config.get("target_modules")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise MloraError(f"{what}: adapter_config.json needs 'r' and a list of target_modules")
    problem = shape_problem(config, {"r": int}) or _numbers_problem(config)
    if problem or config["r"] < 1:
        raise MloraError(f"{what}: adapter_config.json: {problem or 'key r must be >= 1'}")
    return EmbeddedLora(
        name=Path(folder).name,
        r=int(config["r"]),
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=tuple(sorted(targets)),
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        folder=folder,
    )


def _numbers_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the optional numbers of an embedded adapter's config, or None."""
    for key in ("lora_alpha", "lora_dropout"):
        value = config.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"key {key!r} must be a number"
        if not math.isfinite(value):
            return f"key {key!r} must be finite"
    return None


def tensor_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in an adapter folder, read from the file header only."""
    path = Path(folder) / WEIGHTS_NAME
    if path.is_file():
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    legacy = Path(folder) / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        return {key: tuple(t.shape) for key, t in tensors.items()}
    raise MloraError(f"no adapter weights in {folder} ({WEIGHTS_NAME} not found)")


def check_same_base(adapters: list[EmbeddedLora], where: str) -> None:
    """Every layer has one (in, out) shape across the adapters: they share a base model.

    Raises:
        MloraError: naming the two folders and the layer whose shapes differ.
    """
    seen: dict[tuple[str, str], tuple[int, str]] = {}  # (layer, in|out) -> (size, folder)
    for adapter in adapters:
        if adapter.folder is None:  # from a saved MeteoRA folder: its weights come with it
            raise ValueError(f"embedded adapter {adapter.name!r} has no folder to read")
        for key, shape in tensor_shapes(adapter.folder).items():
            for suffix, side, size in ((".lora_A.weight", "in", -1), (".lora_B.weight", "out", 0)):
                if not key.endswith(suffix) or len(shape) != 2:
                    continue
                layer = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
                first = seen.setdefault((layer, side), (shape[size], adapter.folder))
                if first[0] != shape[size]:
                    raise MloraError(
                        f"{where}: key 'adapters': {adapter.folder} and {first[1]} do not share "
                        f"a base model ({layer} has {shape[size]} {side}put features in one, "
                        f"{first[0]} in the other)"
                    )


def meteora_spec(config: AdapterConfig, where: str | None = None) -> MeteoraSpec:
    """The MeteoraSpec of a validated adapter config whose routing_strategy is meteora, its
    adapter folders read and checked (before the model loads).

    Raises:
        MloraError: a folder that is missing or not an embeddable LoRA, two adapters of one
            name, adapters of different base models, a gated module no adapter targets.
    """
    where = where or f"adapter {config.name!r}"
    adapters = [embedded_lora(folder, where) for folder in config.moe("adapters")]
    names = [adapter.name for adapter in adapters]
    for name in names:
        if names.count(name) > 1:
            raise MloraError(
                f"{where}: key 'adapters': two folders named {name!r} (the folder name is the "
                "task label: rename one)"
            )
    check_same_base(adapters, where)
    targeted = sorted({t for adapter in adapters for t in adapter.target_modules})
    gated = config.moe("gate_target_modules") or targeted
    untargeted = [t for t in gated if t not in targeted]
    if untargeted:
        raise MloraError(
            f"{where}: key 'gate_target_modules': no adapter targets {untargeted[0]!r} (they "
            f"target {', '.join(targeted)})"
        )
    for adapter in adapters:
        unused = sorted(set(adapter.target_modules) - set(gated))
        if unused:
            logger.warning(
                "%s: the LoRA of %s on %s is not used (not in gate_target_modules)",
                where, adapter.name, ", ".join(unused),
            )  # fmt: skip
    return MeteoraSpec(
        r=max(adapter.r for adapter in adapters),
        scaling=1.0,
        dropout=config.lora_dropout,
        target_modules=tuple(sorted(gated)),
        adapters=tuple(adapters),
        top_k=min(config.moe("top_k"), len(adapters)) if config.top_k is None else config.top_k,
        temperature=float(config.moe("temperature")),
        train_loras=config.moe("train_loras"),
        gate_loss_coef=float(config.moe("gate_loss_coef")),
        task_field=config.moe("task_field"),
        forward_mode=config.moe("forward_mode"),
    )


def load_embedded_adapters(model: Any, name: str) -> None:
    """Copy each embedded adapter's weights from its folder into MeteoRA adapter ``name``.

    Raises:
        MloraError: a tensor missing from a folder, or shaped for another base (naming both).
    """
    spec: MeteoraSpec = model.specs[name]
    for index, adapter in enumerate(spec.adapters):
        if adapter.folder is None:  # from a saved MeteoRA folder: its weights come with it
            raise ValueError(f"embedded adapter {adapter.name!r} has no folder to read")
        _, tensors = read_adapter(adapter.folder)
        params = {
            f"{PEFT_PREFIX}{path}.{suffix}": tensor
            for path, module in model.adapter_modules(name)
            if str(index) in module.loras
            for suffix, tensor in lora_tensors(module.loras[str(index)]).items()
        }
        copy_into(params, tensors, adapter.folder)
        logger.info("adapter %s: embedded %s from %s", name, adapter.name, adapter.folder)


# --- a trained MeteoRA folder ------------------------------------------------------------------


def named_parameters(model: Any, name: str) -> dict[str, torch.Tensor]:
    """Every parameter of MeteoRA adapter ``name`` under its key in the file (live tensors)."""
    spec: MeteoraSpec = model.specs[name]
    params: dict[str, torch.Tensor] = {}
    for path, module in model.adapter_modules(name):
        assert isinstance(module, MeteoraAdapter)
        params[f"{PEFT_PREFIX}{path}.gate.weight"] = module.gate.weight
        for key, lora in module.loras.items():
            adapter = spec.adapters[int(key)].name
            for suffix, tensor in lora_tensors(lora).items():
                params[f"{PEFT_PREFIX}{path}.loras.{adapter}.{suffix}"] = tensor
    return params


def optional_tensor(key: str) -> bool:
    """Every tensor of a MeteoRA folder must be there."""
    return False


def peft_config(spec: MeteoraSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a MeteoRA adapter."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "routing_strategy": "meteora",
        "r": spec.r,
        "lora_dropout": float(spec.dropout),
        "target_modules": sorted(spec.target_modules),
        "gate_target_modules": sorted(spec.target_modules),
        "adapters": [
            {
                "name": adapter.name,
                "r": adapter.r,
                "lora_alpha": adapter.lora_alpha,
                "use_rslora": adapter.use_rslora,
                "target_modules": sorted(adapter.target_modules),
                "lora_dropout": adapter.lora_dropout,
            }
            for adapter in spec.adapters
        ],
        "top_k": spec.top_k,
        "temperature": float(spec.temperature),
        "train_loras": spec.train_loras,
        "gate_loss_coef": float(spec.gate_loss_coef),
        "task_field": spec.task_field,
        "forward_mode": spec.forward_mode,
    }


def spec_from_config(config: dict[str, Any], source: str) -> MeteoraSpec:
    """The MeteoraSpec of a METEORA ``adapter_config.json`` (its weights come with the folder).

    Raises:
        MloraError: a required key missing or malformed (naming the file).
    """
    try:
        adapters = tuple(
            EmbeddedLora(
                name=str(item["name"]),
                r=int(item["r"]),
                lora_alpha=float(item["lora_alpha"]),
                use_rslora=bool(item.get("use_rslora", False)),
                target_modules=tuple(sorted(item["target_modules"])),
                lora_dropout=float(item.get("lora_dropout", 0.0)),
            )
            for item in config["adapters"]
        )
        spec = MeteoraSpec(
            r=max(adapter.r for adapter in adapters),
            scaling=1.0,
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=tuple(sorted(config["gate_target_modules"])),
            adapters=adapters,
            top_k=int(config.get("top_k", 2)),
            temperature=float(config.get("temperature", 1.0)),
            train_loras=bool(config.get("train_loras", False)),
            gate_loss_coef=float(config.get("gate_loss_coef", 50.0)),
            task_field=config.get("task_field"),
            forward_mode=str(config.get("forward_mode", "grouped")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MloraError(f"{source}: METEORA adapter_config is malformed ({exc!r})") from None
    if not 1 <= spec.top_k <= len(adapters) or spec.forward_mode not in ("grouped", "loop"):
        raise MloraError(
            f"{source}: METEORA adapter_config has top_k {spec.top_k} for {len(adapters)} "
            f"adapters, forward_mode {spec.forward_mode!r}"
        )
    return spec
