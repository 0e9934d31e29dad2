"""Checkpoints: model, optimiser, schedule, method state and loop counters in one file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from ..errors import MMBalanceError


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a run stopped mid-save keeps the previous checkpoint


def load_checkpoint(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise MMBalanceError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupted or foreign file
        raise MMBalanceError(f"checkpoint '{path}' could not be read: {exc}") from exc
