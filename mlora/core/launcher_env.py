"""What a launcher (torchrun, accelerate) says about this process, read from the environment:
plain Python, so command lines can ask before torch is imported."""

from __future__ import annotations

import os


def env_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def env_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
