"""Config: the training config's keys and checks (``schema``), adapter names, upstream m-LoRA keys.

The four names users import from here are re-exported; everything else lives in ``schema``.
"""

from mlora.config.schema import AdapterConfig, TrainConfig, load_config, parse_config

__all__ = ["AdapterConfig", "TrainConfig", "load_config", "parse_config"]
