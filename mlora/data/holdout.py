"""The held-out validation split of an adapter's data (``val_set_size``).

The validation rows are drawn from the seed and the data source alone, so the same data and
``--seed`` always hold out the same rows, whatever adapter trains on them and whatever trains
beside it (a sweep's trials are all scored on the same rows); the training rows are the rest,
in file order, and never include a validation row.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import TypeVar

from mlora.core.errors import DataError

Row = TypeVar("Row")


def holdout_count(total: int, size: int | float) -> int:
    """Rows held out of ``total``: ``size`` itself (an int) or ``round(size * total)``, >= 1."""
    return size if isinstance(size, int) else max(1, round(size * total))


def holdout_indices(total: int, size: int | float, seed: int, source: str) -> list[int]:
    """The sorted indices of the validation rows among the ``total`` rows of ``source``.

    Raises:
        DataError: the split would leave no training row.
    """
    count = holdout_count(total, size)
    if count >= total:
        raise DataError(
            f"{source}: key 'val_set_size' ({size}) holds out {count} of its {total} rows, "
            "leaving none to train on"
        )
    rng = random.Random(seed * 1_000_003 + zlib.crc32(f"validation:{source}".encode()))
    return sorted(rng.sample(range(total), count))


def split_rows(
    rows: Sequence[Row], size: int | float, seed: int, source: str
) -> tuple[list[Row], list[Row]]:
    """``(training rows, validation rows)`` of data ``source``, each in file order; disjoint,
    together all rows.

    Raises:
        DataError: naming ``source`` when no training row would be left.
    """
    held = set(holdout_indices(len(rows), size, seed, source))
    train = [row for i, row in enumerate(rows) if i not in held]
    validation = [row for i, row in enumerate(rows) if i in held]
    return train, validation
