"""Checkpoints: model, optimiser, schedule, method state and loop counters in one file.

A checkpoint holds only tensors and plain Python values and is always read with
``torch.load(..., weights_only=True)``: a file carrying any other pickled object (a crafted
payload included) is refused, and nothing in it is executed. Writes go to a temporary file
first and replace the old file only when complete, so a full disk or a stopped run keeps the
last good checkpoint and leaves no ``*.tmp`` behind.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from ..errors import MMBalanceError


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        try:
            tmp.unlink()
        except OSError:
            pass
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MMBalanceError(f"cannot write '{path}': {reason} (disk full or folder not writable?); "
                             f"the previous file, if any, is intact") from None


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def write_text(path: Path, text: str) -> None:
    """Write a run file atomically, with a clear error naming the path on failure."""
    _atomic(path, lambda tmp: tmp.write_text(text))


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MMBalanceError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MMBalanceError(f"checkpoint '{path}' was refused: it holds objects other than tensors and plain "
                             f"values, and is never unpickled in full (it may have been crafted or written by "
                             f"another program). Details: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # corrupted or foreign file
        raise MMBalanceError(f"checkpoint '{path}' could not be read: {exc}") from None
