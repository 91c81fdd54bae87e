"""Model: the frozen base model (loaded, resolved, or the demo model) wrapped as a
``MultiLoraModel`` that holds the adapters.

Imports the adapters and batching below it; nothing here reads or writes adapter files.
"""
