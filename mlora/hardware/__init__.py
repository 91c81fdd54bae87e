"""Hardware: the compute backends (CUDA, MPS, CPU) and the dtypes each one can compute in.

Imports only mlora.core.
"""
