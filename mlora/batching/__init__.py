"""Batching: one packed batch, each adapter owning a contiguous token segment.

The layout of that batch (``layout``), the per-adapter random streams and side losses it carries,
the dispatcher that picks each step's rows, the collation into tensors and the packing choice.
"""
