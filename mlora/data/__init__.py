"""Data: prompt templates, training rows read and tokenized, and the evaluation tasks' questions.

Imports mlora.core and mlora.config; no torch modules, no model.
"""
