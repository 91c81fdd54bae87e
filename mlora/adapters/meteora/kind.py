"""MeteoRA as the registry sees it (``mlora.adapters.kinds``): it fills a new adapter from the
LoRA folders it embeds, labels rows by task, and takes its wrapped modules from those folders."""

from __future__ import annotations

from mlora.adapters.adapter_kind import AdapterKind, upstream_format
from mlora.adapters.meteora import format as meteora_format

KIND = AdapterKind(
    "MeteoRA",
    ("meteora",),
    (meteora_format.PEFT_TYPE,),
    meteora_format.meteora_spec,
    **upstream_format(
        meteora_format,
        load_fresh=meteora_format.load_embedded_adapters,
        task_field=lambda config: config.moe("task_field"),
        own_targets=lambda config, where: list(
            meteora_format.meteora_spec(config, where).target_modules
        ),
    ),
)
