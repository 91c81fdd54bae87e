"""Hyperparameter sweeps in one run: Optuna's trials trained side by side on one base model,
validated while they train, pruned or stopped early, with their results written at the end."""
