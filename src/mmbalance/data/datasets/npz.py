"""Generic ``.npz`` datasets: ``--dataset path/to/file.npz``.

Arrays:
  * ``y`` [N] integer labels 0..K-1;
  * ``split`` [N] strings "train" / "val" / "test" (unicode or bytes arrays; bytes are decoded as
    UTF-8; surrounding whitespace and case are ignored);
  * one ``x_<modality>`` [N, ...] numeric array per modality (any number; order = order in the file);
  * optional ``class_names`` [K] strings: ``bundle.class_names``; it also fixes K (``data.num_classes``
    may repeat it but must agree).
Any other array is ignored with a warning. Files are read with ``allow_pickle=False``, so object
arrays (``dtype=object``, e.g. ``np.array(strings, dtype=object)``) are refused: save strings as a
unicode array, ``np.array(list_of_str)``.

The encoder is picked from each per-sample shape. When the file has no "val" rows, a seeded
stratified hold-out of ``val_fraction`` of train becomes the validation split (never test).

Standardisation (``data.standardize``), fitted on the train split only (after the val hold-out is
carved out) and applied to every split:
  * ``auto`` (default): ``[D]`` inputs per feature, ``[T, D]`` inputs per last-dim feature (pooled
    over rows and T); image-like inputs (3 or more dims per sample: ``[C, H, W]``, ``[T, C, H, W]``)
    are left as they are;
  * ``train``: like ``auto``, and image-like inputs per channel (dim -3, pooled over everything else);
  * ``none``: inputs are used as stored.
Features that are constant on train keep std 1 (centred, not scaled) and a warning says how many.
The fitted statistics are set on the returned bundle as ``bundle.transform_state``::

    {"standardize": {modality: {"mean": Tensor, "std": Tensor}}}

holding only the standardised modalities (``{}`` under ``none``); float32 tensors shaped to
broadcast against one sample (``[D]`` for ``[D]`` and ``[T, D]``, ``[C, 1, 1]`` for images), so
``(x - mean) / std`` is what was applied. They depend only on the file and ``val_seed``/``val_fraction``,
so reloading recomputes identical values.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ...errors import DataError
from ..base import SPLITS, DataBundle, TensorMultimodalDataset, register_dataset, stratified_holdout
from ..checks import check_bundle

STANDARDIZE = ("auto", "none", "train")


@dataclass
class NpzOptions:
    num_classes: int = 0  # 0 = len(class_names) if the file has them, else max(y) + 1
    val_fraction: float = 0.1
    val_seed: int = 0
    standardize: str = "auto"  # auto | none | train (see the module docstring)

    def validate(self):
        errs = []
        if self.standardize not in STANDARDIZE:
            errs.append(f"standardize must be one of {', '.join(STANDARDIZE)}, got '{self.standardize}'")
        if self.num_classes < 0:
            errs.append(f"num_classes must be >= 0 (0 = from the file), got {self.num_classes}")
        if not 0.0 < self.val_fraction < 1.0:
            errs.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        return errs


def _array(f, key: str, p: Path) -> np.ndarray:
    try:
        return f[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"'{p}': array '{key}' is an object array (dtype=object), which cannot be read "
                            f"without pickle (disabled for safety); save strings as a unicode array, "
                            f"np.array(list_of_str), and numbers as a float or int array") from None
        raise DataError(f"'{p}': array '{key}' cannot be read: {exc}") from None
    except Exception as exc:
        raise DataError(f"'{p}': array '{key}' cannot be read: {exc}") from None


def _strings(f, key: str, p: Path, expected: str) -> np.ndarray:
    """Array ``key`` as a 1-D unicode array (bytes decoded as UTF-8)."""
    a = _array(f, key, p)
    if a.ndim != 1:
        raise DataError(f"'{p}': array '{key}' must be 1-D ({expected}), got shape {list(a.shape)}")
    if a.dtype.kind == "U":
        return a
    if a.dtype.kind != "S":
        first = f"; index 0 is {a[0]!r}" if len(a) else ""
        raise DataError(f"'{p}': array '{key}' must hold strings ({expected}), got dtype {a.dtype}{first}; "
                        f"save it as np.array(list_of_str)")
    out = []
    for i, v in enumerate(a.tolist()):
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"'{p}': array '{key}' index {i} holds {v!r}, which is not UTF-8 text") from None
    return np.array(out, dtype=str).reshape(len(out))


def fit_standardize(x: np.ndarray, mode: str) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
    """``(mean, std, n_constant)`` of the train rows ``x`` [N, ...], or None if ``mode`` leaves it alone.

    mean/std are float32, shaped to broadcast against one sample; constant features get std 1.
    """
    per = x.ndim - 1
    if mode == "none" or (mode == "auto" and per >= 3):
        return None
    if per >= 3:  # image-like [..., C, H, W]: per channel
        axes = tuple(i for i in range(x.ndim) if i != x.ndim - 3)
        shape: Tuple[int, ...] = (x.shape[-3], 1, 1)
    else:  # [D], [T, D] (and scalars): per last-dim feature
        axes = tuple(range(max(x.ndim - 1, 1)))
        shape = x.shape[1:][-1:]
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    const = np.ptp(x, axis=axes) == 0
    std = np.where(const, 1.0, std)
    return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32), int(const.sum())


def standardize_bundle(bundle: DataBundle, mode: str, where: str = "") -> Dict[str, Dict[str, torch.Tensor]]:
    """Fit on ``bundle.train`` and standardise every split in place (TensorMultimodalDataset splits).

    Returns ``{modality: {"mean": Tensor, "std": Tensor}}`` for the modalities it changed.
    """
    where = where or f"dataset '{bundle.name}'"
    stats: Dict[str, Dict[str, torch.Tensor]] = {}
    for m in bundle.modalities:
        fit = fit_standardize(bundle.splits["train"].inputs[m].numpy(), mode)
        if fit is None:
            continue
        mean, std, n_const = fit
        if n_const:
            warnings.warn(f"{where}: modality '{m}' has {n_const} of {mean.size} feature(s) constant on the "
                          f"train split (std 0); they are centred but not scaled", UserWarning, stacklevel=3)
        stats[m] = {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}
        for s in SPLITS:
            ds = bundle.splits[s]
            ds.inputs[m] = (ds.inputs[m] - stats[m]["mean"]) / stats[m]["std"]
    return stats


def load_npz(path: str | Path, options: Optional[NpzOptions] = None) -> DataBundle:
    """Load, check and standardise an ``.npz`` dataset (see the module docstring)."""
    o = options or NpzOptions()
    if o.standardize not in STANDARDIZE:
        raise DataError(f"standardize must be one of {', '.join(STANDARDIZE)}, got '{o.standardize}'")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file '{p}' does not exist")
    try:
        f = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"'{p}' is not a readable .npz file: {exc}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"'{p}' holds a single array, not an .npz archive of named arrays (use np.savez)")
    with f:
        return _load(f, p, o)


def _load(f, p: Path, o: NpzOptions) -> DataBundle:
    names = list(f.files)
    if "y" not in names:
        raise DataError(f"'{p}': missing array 'y' (integer labels [N]); arrays present: {names}")
    if "split" not in names:
        raise DataError(f"'{p}': missing array 'split' ([N] strings train/val/test); arrays present: {names}")
    mods = [n[2:] for n in names if n.startswith("x_")]
    if not mods:
        raise DataError(f"'{p}': no modality arrays; name them 'x_<modality>' (e.g. x_audio); arrays present: {names}")
    if "" in mods:
        raise DataError(f"'{p}': array 'x_' has no modality name; name it 'x_<modality>' (e.g. x_audio)")
    for key in names:
        if key not in ("y", "split", "class_names") and not key.startswith("x_"):
            warnings.warn(f"'{p}': ignoring array '{key}' (expected 'y', 'split', 'class_names' and "
                          f"'x_<modality>')", UserWarning, stacklevel=3)
    y = _array(f, "y", p)
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
    class_names = None
    if "class_names" in names:
        class_names = [str(s) for s in _strings(f, "class_names", p, "[K] class names")]
        if not class_names:
            raise DataError(f"'{p}': array 'class_names' is empty; expected one name per class")
        if o.num_classes and o.num_classes != len(class_names):
            raise DataError(f"'{p}': array 'class_names' has {len(class_names)} names but "
                            f"data.num_classes={o.num_classes}; they must agree (or leave num_classes at 0)")
        k = len(class_names)
    else:
        k = o.num_classes or (int(y.max()) + 1 if n else 0)
    bad = np.flatnonzero((y < 0) | (y >= k))
    if len(bad):
        source = " (K from 'class_names')" if class_names else (" (K from data.num_classes)" if o.num_classes else "")
        raise DataError(f"'{p}': array 'y' has label {y[bad[0]]} at index {bad[0]}; labels must be in 0..{k - 1}{source}")
    split = _strings(f, "split", p, "[N] strings train/val/test")
    if split.shape != (n,):
        raise DataError(f"'{p}': array 'split' has shape {list(split.shape)} but 'y' has {n} rows")
    split = np.char.lower(np.char.strip(split))
    bad = np.flatnonzero(~np.isin(split, SPLITS))
    if len(bad):
        raise DataError(f"'{p}': array 'split' has unknown value '{split[bad[0]]}' at index {bad[0]}; "
                        f"expected one of {list(SPLITS)}")
    inputs = {}
    for m in mods:
        x = _array(f, f"x_{m}", p)
        if x.ndim == 0 or x.shape[0] != n:
            raise DataError(f"'{p}': array 'x_{m}' has {x.shape[0] if x.ndim else 0} rows but 'y' has {n}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"'{p}': array 'x_{m}' must be numeric, got dtype {x.dtype}")
        x = x.astype(np.float32)
        finite = np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
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
    bundle = DataBundle(p.name, tuple(mods), k, splits, class_names=class_names,
                        input_shapes={m: tuple(x.shape[1:]) for m, x in inputs.items()})
    check_bundle(bundle)
    bundle.transform_state = {"standardize": standardize_bundle(bundle, o.standardize, f"'{p}'")}
    return bundle


@register_dataset("npz", options=NpzOptions,
                  description="your own arrays: --dataset path/to/file.npz (y, split, x_<modality>, "
                              "optional class_names)")
def build_npz(options: NpzOptions, data_cfg=None, seed: int = 0) -> DataBundle:
    path = getattr(data_cfg, "name", None) or ""
    if not str(path).endswith(".npz"):
        path = getattr(data_cfg, "root", None) or path
    return load_npz(path, options)
