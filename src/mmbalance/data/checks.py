"""Sanity checks every dataset can go through: ``check_bundle(bundle)``.

Works on any :class:`~mmbalance.data.base.DataBundle` (built-in datasets, ``.npz`` files, bundles
users build themselves) and reads only ``modalities``, ``input_shapes``, ``num_classes``,
``class_names`` and ``splits[s].labels``.

Errors (:class:`~mmbalance.errors.DataError`), the bundle cannot be trained on:
  * a modality with no input shape, or one whose per-sample shape has a 0 (zero-width modality);
  * fewer than 2 classes, or rows of fewer than 2 classes in the train split;
  * ``class_names`` whose length differs from ``num_classes``;
  * a label outside ``0..num_classes-1`` in any split.

Warnings (``UserWarning``), training works but something is probably off:
  * label gaps: a class that has no rows in any split;
  * a class that has val/test rows but no train rows (the model cannot learn it).
"""
from __future__ import annotations

import warnings
from typing import List, Sequence

import numpy as np

from ..errors import DataError
from .base import SPLITS, DataBundle


def _name_classes(bundle: DataBundle, classes: Sequence[int], limit: int = 10) -> str:
    names = bundle.class_names
    items: List[str] = [f"{c} ('{names[c]}')" if names else str(c) for c in classes[:limit]]
    more = f" and {len(classes) - limit} more" if len(classes) > limit else ""
    return ", ".join(items) + more


def check_bundle(bundle: DataBundle) -> None:
    """Raise :class:`DataError` on data that cannot be trained on; warn on suspicious data."""
    where = f"dataset '{bundle.name}'"
    for m in bundle.modalities:
        shape = bundle.input_shapes.get(m)
        if shape is None:
            raise DataError(f"{where}: modality '{m}' has no input shape (input_shapes has {list(bundle.input_shapes)})")
        if 0 in tuple(shape):
            raise DataError(f"{where}: modality '{m}' is zero-width: per-sample shape {list(shape)}; "
                            f"every dimension must be >= 1")
    k = int(bundle.num_classes)
    if bundle.class_names is not None and len(bundle.class_names) != k:
        raise DataError(f"{where}: class_names has {len(bundle.class_names)} names but num_classes is {k}; "
                        f"expected one name per class")
    if k < 2:
        raise DataError(f"{where}: num_classes is {k}; classification needs at least 2 classes")
    counts = {}
    for s in SPLITS:
        labels = np.asarray(bundle.splits[s].labels, dtype=np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        if len(bad):
            raise DataError(f"{where}: split '{s}' has label {labels[bad[0]]} at index {bad[0]}; "
                            f"labels must be in 0..{k - 1}")
        counts[s] = np.bincount(labels, minlength=k)
    in_train = np.flatnonzero(counts["train"])
    if len(in_train) < 2:
        present = _name_classes(bundle, list(in_train)) or "none"
        raise DataError(f"{where}: the train split has rows of {len(in_train)} class(es) (present: {present}); "
                        f"at least 2 classes are needed")
    anywhere = sum(counts.values())
    gaps = [int(c) for c in np.flatnonzero(anywhere == 0)]
    if gaps:
        warnings.warn(f"{where}: label gap: class(es) {_name_classes(bundle, gaps)} have no rows in any split "
                      f"(num_classes={k}); the model still outputs {k} classes", UserWarning, stacklevel=2)
    untrained = [int(c) for c in np.flatnonzero((counts["train"] == 0) & (anywhere > 0))]
    if untrained:
        warnings.warn(f"{where}: class(es) {_name_classes(bundle, untrained)} have no train rows "
                      f"(only val/test rows); the model cannot learn them", UserWarning, stacklevel=2)
