"""MixLoRA as the registry sees it (``mlora.adapters.kinds``)."""

from __future__ import annotations

from mlora.adapters.adapter_kind import AdapterKind, upstream_format
from mlora.adapters.mixlora import format as mixlora_format
from mlora.adapters.mixlora.spec import mixlora_spec
from mlora.config.schema import MIXLORA_STRATEGIES

KIND = AdapterKind(
    "MixLoRA",
    tuple(MIXLORA_STRATEGIES),
    ("MIXLORA",),
    mixlora_spec,
    **upstream_format(mixlora_format),
)
