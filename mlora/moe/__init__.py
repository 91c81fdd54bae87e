"""MixLoRA: mixture-of-LoRA-experts FFNs (strategies mixlora, mixlora-dynamic, mixlora-switch)."""

from mlora.moe.feed_forward import MixLoraExperts, MixLoraFeedForward
from mlora.moe.routing import RouterSpec
from mlora.moe.spec import MixLoraSpec, attach_mixlora, mixlora_spec

__all__ = [
    "MixLoraExperts",
    "MixLoraFeedForward",
    "MixLoraSpec",
    "RouterSpec",
    "attach_mixlora",
    "mixlora_spec",
]
