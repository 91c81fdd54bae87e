"""Persistence: adapters on disk in PEFT format, one module per kind's format, and the
registry of kinds.

``kinds`` is the registry every caller asks; ``adapter_files`` saves and reads a whole folder.
"""
