"""Batches of in-memory tensor datasets by slicing, without a DataLoader.

A :class:`~mmbalance.data.base.TensorMultimodalDataset` (or a :class:`~mmbalance.data.base.Subset`
view of one) already holds every modality as one ``[N, ...]`` tensor. Building a batch through a
``DataLoader`` costs a ``__getitem__`` per sample (a dict, one indexing per modality) and a
``collate`` (``torch.stack`` of B small tensors); for a small model that Python work dominates the
step (docs/benchmarks.md, "Small-model speed"). :func:`tensor_batches` gathers each batch with one
``index_select`` per modality instead. The batches are identical to ``collate``'s -- same values,
dtypes, ``index`` and ``tag`` -- so results do not change (tests/test_fastpath.py).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Subset, TensorMultimodalDataset
from .batch import NO_TAG, Batch


def tensor_source(dataset: Any) -> Optional[Tuple[Dict[str, torch.Tensor], Optional[np.ndarray], np.ndarray]]:
    """``(inputs, rows, labels)`` (the root dataset's tensors and labels) when ``dataset`` is a
    plain in-memory tensor dataset (exactly a :class:`TensorMultimodalDataset`, possibly behind
    :class:`Subset` views -- a subclass may
    transform samples in ``get_inputs``, so it takes the general path); ``rows`` maps the
    dataset's indices to the tensors' rows (``None`` = identity). Otherwise ``None``."""
    rows: Optional[np.ndarray] = None
    ds = dataset
    while type(ds) is Subset:
        rows = ds.indices if rows is None else ds.indices[rows]
        ds = ds.base
    if type(ds) is not TensorMultimodalDataset:
        return None
    return ds.inputs, rows, ds.labels


def tensor_batches(source, indices: Sequence[Any], batch_size: int, pin: bool = False) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows in the order of ``indices`` (ints, or ``(index, tag)``
    pairs as a method's sampler gives them), as ``collate`` would build them."""
    inputs, rows, labels = source
    tagged = any(isinstance(i, tuple) for i in indices)
    if tagged:
        idx = np.asarray([i[0] if isinstance(i, tuple) else i for i in indices], dtype=np.int64)
        tags = torch.as_tensor(np.asarray([i[1] if isinstance(i, tuple) else NO_TAG for i in indices],
                                          dtype=np.int64))
    else:
        idx = np.asarray(list(indices), dtype=np.int64)
        tags = None
    index_all = torch.from_numpy(idx)
    data = np.ascontiguousarray(rows[idx] if rows is not None else idx)  # rows of the tensors
    label_all = torch.from_numpy(np.ascontiguousarray(labels[data], dtype=np.int64))
    data_rows = torch.from_numpy(data)
    for a in range(0, len(idx), batch_size):
        sel = data_rows[a:a + batch_size]
        batch = Batch({m: x.index_select(0, sel) for m, x in inputs.items()},
                      label_all[a:a + batch_size].clone(), index_all[a:a + batch_size].clone(),
                      tags[a:a + batch_size].clone() if tags is not None else None)
        yield batch.pin_memory() if pin else batch
