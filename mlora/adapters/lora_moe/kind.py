"""LoRAMoE and MoLA as the registry sees them (``mlora.adapters.kinds``): one kind, two
strategies and two ``peft_type``s."""

from __future__ import annotations

from mlora.adapters.adapter_kind import AdapterKind, upstream_format
from mlora.adapters.lora_moe import format as lora_moe_format
from mlora.adapters.lora_moe.spec import linear_moe_spec
from mlora.config.schema import LINEAR_MOE_STRATEGIES

KIND = AdapterKind(
    "LoRAMoE / MoLA",
    tuple(LINEAR_MOE_STRATEGIES),
    ("LORAMOE", "MOLA"),
    linear_moe_spec,
    **upstream_format(lora_moe_format),
)
