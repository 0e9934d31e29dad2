"""Frame folders (1 fps JPEG extractions) and segment sampling.

Accepted frame names (spec §5): ``00000.jpg`` (C-OGM ``%05d``), ``frame_00001.jpg`` (GeWu,
1-indexed), ``frame_00000.jpg`` (ARM, 0-indexed), ``frame000001.jpg`` (TV-L1 flow release), and in
general any ``<prefix><number>.<jpg|jpeg|png>``. Files are ordered by that number (not by string),
ties broken by name, so the order is deterministic whatever ``os.listdir`` returns.

Segment sampling (TSN style, as in the community loaders): the ``n`` frames are split into ``T``
equal segments ``[floor(k n / T), floor((k+1) n / T))``; training takes a uniformly random frame of
each segment, evaluation the middle one. ``n < T`` is an error unless ``pad=True`` (then frames
repeat: index ``floor(k n / T)``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..errors import DataError

FRAME_EXTS = (".jpg", ".jpeg", ".png")
_NUM = re.compile(r"(\d+)(?=\.[A-Za-z]+$)")


def frame_number(name: str) -> int:
    """The number at the end of a frame file name (``frame_00012.jpg`` -> 12); -1 if none."""
    m = _NUM.search(name)
    return int(m.group(1)) if m else -1


def list_frames(folder: Union[str, Path], what: str = "frame folder") -> List[Path]:
    """Image files of ``folder`` sorted by their frame number. Raises DataError if missing or empty."""
    folder = Path(folder)
    try:
        names = [n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTS) and not n.startswith(".")]
    except FileNotFoundError:
        raise DataError(f"{what} '{folder}' does not exist") from None
    except NotADirectoryError:
        raise DataError(f"{what} '{folder}' is not a directory") from None
    if not names:
        raise DataError(f"{what} '{folder}' holds no .jpg/.png frames")
    names.sort(key=lambda n: (frame_number(n), n))
    return [folder / n for n in names]


def segment_indices(n: int, t: int, train: bool, generator: Optional[torch.Generator] = None,
                    pad: bool = False) -> List[int]:
    """``t`` frame indices out of ``n`` by segment sampling (random in segment for train, middle for eval)."""
    if t < 1:
        raise ValueError(f"number of frames per clip must be >= 1, got {t}")
    if n < t:
        if not pad or n < 1:
            raise DataError(f"clip has {n} frame(s) but {t} are sampled per clip")
        return [(k * n) // t for k in range(t)]
    out = []
    for k in range(t):
        lo, hi = (k * n) // t, ((k + 1) * n) // t  # hi > lo because n >= t
        if train:
            out.append(lo + int(torch.randint(0, hi - lo, (1,), generator=generator)))
        else:
            out.append((lo + hi - 1) // 2)
    return out


__all__ = ["FRAME_EXTS", "frame_number", "list_frames", "segment_indices"]
