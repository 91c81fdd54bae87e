"""LoRAMoE and MoLA: a mixture of LoRA experts inside each adapted linear layer.

``layer`` holds the modules (the experts and their router); ``spec`` places them in a model.
"""
