"""MeteoRA: many LoRA adapters embedded in one layer, chosen per token by a gate.

``layer`` holds the module; ``spec`` places it in a model.
"""
