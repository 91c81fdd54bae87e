"""mlora: fine-tune many LoRA-family adapters at once on one shared, frozen base LLM.

Notebook use::

    import mlora
    config = mlora.load_config("config/example.json")
    trainer = mlora.train(config, base_model="path/to/model", output_dir="out")
    results = mlora.evaluate(config, base_model="path/to/model", output_dir="out")
    model, tokenizer = mlora.load_trained("path/to/model", {"math": "out/math"})
    answers = mlora.generate(model, tokenizer, [("What is 2+3?", "math")])
"""

from mlora.adapters.spec import LoraSpec
from mlora.api import check_outputs, train
from mlora.batching.layout import AdapterSegment, BatchLayout, LayoutContext
from mlora.config.schema import AdapterConfig, TrainConfig, load_config, parse_config
from mlora.core.errors import ConfigError, DataError, MloraError
from mlora.inference.evaluation import AdapterResult, evaluate
from mlora.inference.generation import GenerationOutput, GenerationRequest, SamplingParams, generate
from mlora.inference.trained import load_trained
from mlora.model.multi_lora import MultiLoraModel, load_base_model
from mlora.persistence.adapter_files import read_adapter, save_adapter
from mlora.training.trainer import Trainer, prepare_data

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
    "TrainConfig",
    "Trainer",
    "check_outputs",
    "evaluate",
    "generate",
    "load_base_model",
    "load_config",
    "load_trained",
    "parse_config",
    "prepare_data",
    "read_adapter",
    "save_adapter",
    "train",
]
