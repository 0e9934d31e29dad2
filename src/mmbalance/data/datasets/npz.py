"""Generic ``.npz`` datasets: ``--dataset path/to/file.npz``.

Arrays: ``y`` [N] integer labels 0..K-1; ``split`` [N] strings "train" / "val" / "test"; one
``x_<modality>`` [N, ...] float array per modality (any number; order = order in the file).
The encoder is picked from each per-sample shape. When the file has no "val" rows, a seeded
stratified hold-out of ``val_fraction`` of train becomes the validation split (never test).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...errors import DataError
from ..base import SPLITS, DataBundle, TensorMultimodalDataset, register_dataset, stratified_holdout


@dataclass
class NpzOptions:
    num_classes: int = 0  # 0 = max(y) + 1
    val_fraction: float = 0.1
    val_seed: int = 0


def load_npz(path: str | Path, options: Optional[NpzOptions] = None) -> DataBundle:
    o = options or NpzOptions()
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file '{p}' does not exist")
    try:
        f = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"'{p}' is not a readable .npz file: {exc}") from None
    names = list(f.files)
    if "y" not in names:
        raise DataError(f"'{p}': missing array 'y' (integer labels [N]); arrays present: {names}")
    if "split" not in names:
        raise DataError(f"'{p}': missing array 'split' ([N] strings train/val/test); arrays present: {names}")
    mods = [n[2:] for n in names if n.startswith("x_")]
    if not mods:
        raise DataError(f"'{p}': no modality arrays; name them 'x_<modality>' (e.g. x_audio); arrays present: {names}")
    unknown = [n for n in names if n not in ("y", "split") and not n.startswith("x_")]
    if unknown:
        raise DataError(f"'{p}': unexpected arrays {unknown}; expected only 'y', 'split' and 'x_<modality>'")
    y = f["y"]
    if y.ndim != 1:
        raise DataError(f"'{p}': array 'y' must be 1-D [N], got shape {list(y.shape)}")
    n = len(y)
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"'{p}': array 'y' must hold integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"'{p}': array 'y' must hold integers; index {bad[0]} has {y[bad[0]]}")
    y = y.astype(np.int64)
    k = o.num_classes or int(y.max()) + 1 if n else 0
    bad = np.flatnonzero((y < 0) | (y >= k))
    if len(bad):
        raise DataError(f"'{p}': array 'y' has label {y[bad[0]]} at index {bad[0]}; labels must be in 0..{k - 1}")
    split = f["split"]
    if split.shape != (n,):
        raise DataError(f"'{p}': array 'split' has shape {list(split.shape)} but 'y' has {n} rows")
    split = split.astype(str)
    bad = np.flatnonzero(~np.isin(split, SPLITS))
    if len(bad):
        raise DataError(f"'{p}': array 'split' has unknown value '{split[bad[0]]}' at index {bad[0]}; "
                        f"expected one of {list(SPLITS)}")
    inputs = {}
    for m in mods:
        x = f[f"x_{m}"]
        if x.shape[0] != n:
            raise DataError(f"'{p}': array 'x_{m}' has {x.shape[0]} rows but 'y' has {n}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"'{p}': array 'x_{m}' must be numeric, got dtype {x.dtype}")
        x = x.astype(np.float32)
        finite = np.isfinite(x.reshape(n, -1)).all(axis=1)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise DataError(f"'{p}': array 'x_{m}' has NaN or inf values at index {i}")
        inputs[m] = x
    if not (split == "train").any():
        raise DataError(f"'{p}': no rows with split 'train'")
    if not (split == "test").any():
        raise DataError(f"'{p}': no rows with split 'test'")
    idx = {s: np.flatnonzero(split == s) for s in SPLITS}
    if len(idx["val"]) == 0:
        keep, held = stratified_holdout(y[idx["train"]], o.val_fraction, o.val_seed)
        idx["val"] = idx["train"][held]
        idx["train"] = idx["train"][keep]
    splits = {s: TensorMultimodalDataset({m: torch.from_numpy(x[i]) for m, x in inputs.items()}, y[i], k)
              for s, i in idx.items()}
    return DataBundle(p.name, tuple(mods), k, splits)


@register_dataset("npz", options=NpzOptions,
                  description="your own arrays: --dataset path/to/file.npz (y, split, x_<modality>)")
def build_npz(options: NpzOptions, data_cfg=None, seed: int = 0) -> DataBundle:
    path = getattr(data_cfg, "name", None) or ""
    if not str(path).endswith(".npz"):
        path = getattr(data_cfg, "root", None) or path
    return load_npz(path, options)
