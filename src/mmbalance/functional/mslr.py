"""MSLR's dynamic rate (spec baselines.md §4.16, strategy ``dynamic``): pure math."""
from __future__ import annotations

from typing import Sequence


def dynamic_rate(history: Sequence[float], current: float, init: float, memory: int = 5) -> float:
    """The non-compounding per-epoch multiplier of one modality,
    ``init * current / mean(history[-memory:])``, and 1 (identity) while fewer than ``memory``
    earlier accuracies are known. ``history``: the modality's validation accuracies of earlier
    evaluations (oldest first, ``current`` not included). A zero mean (no correct prediction in
    the whole window) gives ``init`` (the ratio is undefined; no change is the neutral choice)."""
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    if len(history) < memory:
        return 1.0
    window = [float(a) for a in history[-memory:]]
    mean = sum(window) / len(window)
    if mean <= 0.0:
        return float(init)
    return float(init) * float(current) / mean
