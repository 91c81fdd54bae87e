"""Each adapter's training data, tokenized before the model loads (a bad file fails fast), and
the per-adapter seed that keeps an adapter's init and data independent of the others."""

from __future__ import annotations

from pathlib import Path

from mlora.adapters.kinds import kind_for_config
from mlora.adapters.spec import LoraSpec
from mlora.batching.dispatcher import name_seed
from mlora.config.schema import AdapterConfig, TrainConfig
from mlora.data.dataset import tokenize_dataset
from mlora.data.prompts import load_template
from mlora.data.rows import TokenizedRow
from mlora.training.objectives import check_objective_fits
from mlora.training.validation import training_rows_of


def adapter_seed(seed: int, name: str) -> int:
    """A per-adapter seed, so an adapter's init does not depend on which others exist."""
    return name_seed(seed, name) % (2**63)


def spec_from_config(config: AdapterConfig) -> LoraSpec:
    """The spec of a validated adapter config, built by its kind (``mlora.adapters.kinds``)."""
    return kind_for_config(config).spec_from_config(config)


def prepare_data(config: TrainConfig, tokenizer, seed: int = 42) -> dict[str, list[TokenizedRow]]:
    """Load and tokenize every adapter's training data (before the model loads: fail fast);
    ``seed`` (the trainer's) picks the rows ``val_set_size`` holds out of training."""
    out = {}
    for adapter in config.lora:
        template = load_template(adapter.prompt)
        rows = training_rows_of(adapter, seed)  # choice tasks: question -> right choice
        task_field = kind_for_config(adapter).task_field(adapter)
        fmt, out[adapter.name] = tokenize_dataset(
            rows,
            tokenizer,
            template,
            config.cutoff_len,
            adapter.data_format,
            adapter.train_on_inputs,
            source=adapter.data,
            task_field=task_field,
            task_names=[Path(folder).name for folder in adapter.adapters or ()],
        )
        check_objective_fits(adapter, fmt)
    return out
