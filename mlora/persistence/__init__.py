"""Persistence: adapters on disk in PEFT format, a whole folder at a time.

``adapter_files`` saves and reads a folder through the registry of kinds
(``mlora.adapters.kinds``); each kind's format is in its own folder (``mlora/adapters/KIND/``).
"""
