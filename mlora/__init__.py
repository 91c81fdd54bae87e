"""mlora: fine-tune many LoRA-family adapters at once on one shared, frozen base LLM.

Notebook use::

    import mlora
    config = mlora.load_config("config/example.json")
    trainer = mlora.train(config, base_model="path/to/model", output_dir="out")
    # no model at hand: base_model=mlora.demo_model_path(), the random-weight demo model
    results = mlora.evaluate(config, base_model="path/to/model", output_dir="out")
    model, tokenizer = mlora.load_trained("path/to/model", {"math": "out/math"})
    answers = mlora.generate(model, tokenizer, [("What is 2+3?", "math")])
    result = mlora.run_sweep(mlora.load_config("sweep.json"), base_model="M", output_dir="out")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and editors
    from mlora.adapters.spec import LoraSpec
    from mlora.api import check_outputs, train
    from mlora.batching.layout import AdapterSegment, BatchLayout, LayoutContext
    from mlora.config.schema import AdapterConfig, TrainConfig, load_config, parse_config
    from mlora.core.errors import ConfigError, DataError, MloraError
    from mlora.inference.evaluation import AdapterResult, evaluate
    from mlora.inference.generation import (
        GenerationOutput,
        GenerationRequest,
        SamplingParams,
        generate,
    )
    from mlora.inference.trained import load_trained
    from mlora.model.demo_model import demo_model_path
    from mlora.model.loading import load_base_model
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.persistence.adapter_files import read_adapter, save_adapter
    from mlora.sweep.runner import SweepResult, run_sweep
    from mlora.training.trainer import Trainer, prepare_data

# Each public name and the module that defines it, imported on first use: ``import mlora`` (and
# so every ``mlora.cli`` command, ``launch.py gen`` or ``--help`` included) does not pay seconds
# of torch and transformers imports until a name that needs them is used.
_HOMES = {
    "LoraSpec": "mlora.adapters.spec",
    "check_outputs": "mlora.api",
    "train": "mlora.api",
    "AdapterSegment": "mlora.batching.layout",
    "BatchLayout": "mlora.batching.layout",
    "LayoutContext": "mlora.batching.layout",
    "AdapterConfig": "mlora.config.schema",
    "TrainConfig": "mlora.config.schema",
    "load_config": "mlora.config.schema",
    "parse_config": "mlora.config.schema",
    "ConfigError": "mlora.core.errors",
    "DataError": "mlora.core.errors",
    "MloraError": "mlora.core.errors",
    "AdapterResult": "mlora.inference.evaluation",
    "evaluate": "mlora.inference.evaluation",
    "GenerationOutput": "mlora.inference.generation",
    "GenerationRequest": "mlora.inference.generation",
    "SamplingParams": "mlora.inference.generation",
    "generate": "mlora.inference.generation",
    "load_trained": "mlora.inference.trained",
    "demo_model_path": "mlora.model.demo_model",
    "MultiLoraModel": "mlora.model.multi_lora",
    "load_base_model": "mlora.model.loading",
    "read_adapter": "mlora.persistence.adapter_files",
    "save_adapter": "mlora.persistence.adapter_files",
    "SweepResult": "mlora.sweep.runner",
    "run_sweep": "mlora.sweep.runner",
    "Trainer": "mlora.training.trainer",
    "prepare_data": "mlora.training.trainer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterResult",
    "AdapterSegment",
    "BatchLayout",
    "ConfigError",
    "DataError",
    "GenerationOutput",
    "GenerationRequest",
    "LayoutContext",
    "LoraSpec",
    "MloraError",
    "MultiLoraModel",
    "SamplingParams",
    "SweepResult",
    "TrainConfig",
    "Trainer",
    "check_outputs",
    "demo_model_path",
    "evaluate",
    "generate",
    "load_base_model",
    "load_config",
    "load_trained",
    "parse_config",
    "prepare_data",
    "read_adapter",
    "run_sweep",
    "save_adapter",
    "train",
]
