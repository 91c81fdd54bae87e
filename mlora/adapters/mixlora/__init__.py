"""MixLoRA: mixture-of-LoRA-experts FFNs (strategies mixlora, mixlora-dynamic, mixlora-switch)."""

from mlora.adapters.mixlora.feed_forward import MixLoraExperts, MixLoraFeedForward
from mlora.adapters.mixlora.spec import MixLoraSpec, attach_mixlora, mixlora_spec
from mlora.adapters.routing import RouterSpec

__all__ = [
    "MixLoraExperts",
    "MixLoraFeedForward",
    "MixLoraSpec",
    "RouterSpec",
    "attach_mixlora",
    "mixlora_spec",
]
