"""Training: the trainer loop and what it needs (optimizers, activation recomputation,
distributed training, checks before a run, resumable checkpoints and their run records).
"""
