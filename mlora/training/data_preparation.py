"""Each adapter's training data, tokenized before the model loads (a bad file fails fast), and
the per-adapter seed that keeps an adapter's init and data independent of the others."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from mlora.adapters.kinds import kind_for_config
from mlora.adapters.spec import LoraSpec
from mlora.batching.dispatcher import name_seed
from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.data.dataset import tokenize_dataset
from mlora.data.prompts import load_template
from mlora.data.rows import TokenizedRow
from mlora.data.token_cache import cached_rows
from mlora.training.objectives import check_objective_fits
from mlora.training.validation import adapter_data_key, training_rows_of


def adapter_seed(seed: int, name: str) -> int:
    """A per-adapter seed, so an adapter's init does not depend on which others exist."""
    return name_seed(seed, name) % (2**63)


def spec_from_config(config: AdapterConfig) -> LoraSpec:
    """The spec of a validated adapter config, built by its kind (``mlora.adapters.kinds``)."""
    return kind_for_config(config).spec_from_config(config)


def prepare_data(config: TrainConfig, tokenizer, seed: int = 42) -> dict[str, list[TokenizedRow]]:
    """Load and tokenize every adapter's training data (before the model loads: fail fast);
    ``seed`` (the trainer's) picks the rows ``val_set_size`` holds out of training. With
    ``data_cache`` the rows come from the tokenized data cache when it holds them."""
    out = {}
    for adapter in config.lora:
        task_field = kind_for_config(adapter).task_field(adapter)
        settings = {"data_format": adapter.data_format, "task_field": task_field,
                    "task_names": _task_names(adapter)}  # fmt: skip
        key = adapter_data_key(config, adapter, tokenizer, seed, "train", settings)
        build = partial(_tokenize_training, config, adapter, tokenizer, seed, task_field)
        fmt, out[adapter.name] = cached_rows(key, build)
        check_objective_fits(adapter, fmt)
    return out


def _task_names(adapter: AdapterConfig) -> list[str]:
    """MeteoRA: the names its rows' ``task_field`` chooses from (its embedded adapters)."""
    return [Path(folder).name for folder in adapter.adapters or ()]


def _tokenize_training(
    config: TrainConfig, adapter: AdapterConfig, tokenizer, seed: int, task_field: str | None
) -> tuple[str, list[TokenizedRow]]:
    """The uncached path: read ``adapter``'s training rows and tokenize them."""
    rows = training_rows_of(adapter, seed)  # choice tasks: question -> right choice
    return tokenize_dataset(
        rows,
        tokenizer,
        load_template(adapter.prompt),
        config.cutoff_len,
        adapter.data_format,
        adapter.train_on_inputs,
        source=adapter.data,
        task_field=task_field,
        task_names=_task_names(adapter),
    )
