"""Inference: loading trained adapters onto the base model, generating, and evaluating."""
