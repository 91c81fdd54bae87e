"""Plain LoRA / DoRA as the registry sees it (``mlora.adapters.kinds``): the configs without a
``routing_strategy``, PEFT's ``LORA`` folders, and the default for any other ``peft_type``."""

from __future__ import annotations

from mlora.adapters.adapter_kind import AdapterKind
from mlora.adapters.lora import format as lora_format
from mlora.adapters.lora.spec import lora_spec

KIND = AdapterKind(
    "LoRA / DoRA",
    (None,),
    ("LORA",),
    lora_spec,
    named_parameters=lora_format.named_parameters,
    peft_config=lora_format.peft_config,
    spec_from_peft_config=lora_format.spec_from_peft_config,
    legacy_names=lora_format.legacy_names,
)
