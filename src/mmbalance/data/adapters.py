"""Your own data as a :class:`DataBundle`: a torch ``Dataset`` per split, or arrays per split.

    from mmbalance.data import from_datasets, from_arrays
    data = from_datasets(train=my_train, test=my_test, modalities=["audio", "image"], num_classes=10)
    data = from_arrays(train=({"audio": xa, "image": xi}, y), test=(...), class_names=[...])

A user ``Dataset`` item is ``(inputs, label)``: ``inputs`` a dict ``{modality: tensor}`` with the
declared modalities as keys, or a tuple/list of tensors in the declared modality order; ``label``
an int in ``0..num_classes-1``. Modality names, the class count and class names are declared
once, here. Without a ``val`` split a seeded, stratified ``val_fraction`` of train is held out
(never test). Every item read is checked; a bad one is an error naming the split, the sample
index and what was expected (nothing is dropped).

Floating inputs become float32; integer inputs (token ids) keep their integer type.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DataError
from .base import (SPLITS, DataBundle, MultimodalDataset, Subset, TensorMultimodalDataset, register_dataset,
                   stratified_holdout)


def _as_tensor(x: Any, where: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except Exception as exc:
        raise DataError(f"{where}: expected a tensor or array, got {type(x).__name__} ({exc})") from None
    if t.is_floating_point() or t.dtype == torch.bool:
        return t.to(torch.float32)
    if t.is_complex():
        raise DataError(f"{where}: complex values are not supported")
    return t


class DatasetAdapter(MultimodalDataset):
    """Wraps a user ``Dataset`` whose items are ``(inputs, label)`` (see module docstring)."""

    def __init__(self, dataset: Any, modalities: Sequence[str], num_classes: int, split: str = "train",
                 labels: Optional[Sequence[int]] = None):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise DataError(f"split '{split}': expected a torch Dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        self.base = dataset
        self.modalities = tuple(modalities)
        self.num_classes = int(num_classes)
        self.split = split
        self._labels: Optional[np.ndarray] = None
        if labels is None:
            labels = getattr(dataset, "targets", None)
        if labels is not None:
            self._labels = self._check_labels(np.asarray(labels), "labels")

    def __len__(self) -> int:
        return len(self.base)

    def _check_labels(self, y: np.ndarray, what: str) -> np.ndarray:
        if y.shape != (len(self),):
            raise DataError(f"split '{self.split}': {what} has shape {list(y.shape)}, expected [{len(self)}]")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"split '{self.split}': {what} must hold integers, got dtype {y.dtype}")
        bad = np.flatnonzero((y < 0) | (y >= self.num_classes))
        if len(bad):
            raise DataError(f"split '{self.split}', sample {int(bad[0])}: label {int(y[bad[0]])} is outside "
                            f"0..{self.num_classes - 1}")
        return y.astype(np.int64)

    def _item(self, i: int) -> Tuple[Dict[str, torch.Tensor], int]:
        where = f"split '{self.split}', sample {i}"
        item = self.base[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{where}: expected an item (inputs, label), got {type(item).__name__}"
                            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
        x, y = item
        if isinstance(x, Mapping):
            keys = list(x)
            if set(keys) != set(self.modalities):
                raise DataError(f"{where}: inputs have keys {keys}, expected the declared modalities "
                                f"{list(self.modalities)}")
            inputs = {m: _as_tensor(x[m], f"{where}, modality '{m}'") for m in self.modalities}
        elif isinstance(x, (tuple, list)):
            if len(x) != len(self.modalities):
                raise DataError(f"{where}: inputs hold {len(x)} tensors, expected {len(self.modalities)} "
                                f"(one per modality: {list(self.modalities)})")
            inputs = {m: _as_tensor(v, f"{where}, modality '{m}'") for m, v in zip(self.modalities, x)}
        else:
            raise DataError(f"{where}: inputs must be a dict {{modality: tensor}} or a tuple of tensors, "
                            f"got {type(x).__name__}")
        if isinstance(y, torch.Tensor):
            if y.numel() != 1:
                raise DataError(f"{where}: label must be one integer, got a tensor of shape {list(y.shape)}")
            y = y.item()
        if isinstance(y, (float, np.floating)) and float(y).is_integer():
            y = int(y)
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
            raise DataError(f"{where}: label must be an integer class index, got {y!r}")
        if not 0 <= int(y) < self.num_classes:
            raise DataError(f"{where}: label {int(y)} is outside 0..{self.num_classes - 1}")
        return inputs, int(y)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:  # one pass over the items (pass labels= to skip it)
            self._labels = np.array([self._item(i)[1] for i in range(len(self))], dtype=np.int64)
        return self._labels

    def get_inputs(self, i: int) -> Dict[str, torch.Tensor]:
        inputs, y = self._item(i)
        if self._labels is not None and y != self._labels[i]:
            raise DataError(f"split '{self.split}', sample {i}: item label {y} differs from the declared "
                            f"labels ({int(self._labels[i])})")
        return inputs


def _bundle(name: str, modalities: Sequence[str], num_classes: int, splits: Dict[str, Optional[MultimodalDataset]],
            class_names: Optional[Sequence[str]], val_fraction: float, seed: int) -> DataBundle:
    if splits.get("train") is None or splits.get("test") is None:
        raise DataError("own data needs at least a 'train' and a 'test' split")
    for s, ds in splits.items():
        if ds is not None and len(ds) == 0:
            raise DataError(f"split '{s}' is empty")
    if splits.get("val") is None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        train = splits["train"]
        keep, held = stratified_holdout(train.labels, val_fraction, seed)
        splits = dict(splits, train=Subset(train, keep), val=Subset(train, held))
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise DataError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    bundle = DataBundle(name, tuple(modalities), int(num_classes), {s: splits[s] for s in SPLITS},
                        class_names=class_names)
    bundle.origin = "python"
    return bundle


def _declared(modalities: Optional[Sequence[str]], num_classes: Optional[int], class_names) -> Tuple[List[str], int]:
    if not modalities:
        raise DataError("declare the modality names: modalities=['audio', 'image', ...]")
    if len(set(modalities)) != len(modalities):
        raise DataError(f"modality names must be unique, got {list(modalities)}")
    if num_classes is None:
        if class_names is None:
            raise DataError("declare num_classes (or class_names)")
        num_classes = len(class_names)
    if int(num_classes) < 2:
        raise DataError(f"num_classes must be >= 2, got {num_classes}")
    return [str(m) for m in modalities], int(num_classes)


def from_datasets(train: Any, test: Any, val: Any = None, *, modalities: Sequence[str],
                  num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                  labels: Optional[Mapping[str, Sequence[int]]] = None, name: str = "custom",
                  val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """A bundle from torch ``Dataset`` objects whose items are ``(inputs, label)``.

    ``labels``: optional ``{split: [N] ints}`` so the labels need not be read item by item
    (a dataset's ``targets`` attribute is used the same way).
    """
    mods, k = _declared(modalities, num_classes, class_names)
    labels = labels or {}
    splits = {s: (DatasetAdapter(ds, mods, k, s, labels.get(s)) if ds is not None else None)
              for s, ds in (("train", train), ("val", val), ("test", test))}
    return _bundle(name, mods, k, splits, class_names, val_fraction, seed)


def from_arrays(train: Tuple[Any, Any], test: Tuple[Any, Any], val: Optional[Tuple[Any, Any]] = None, *,
                modalities: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                class_names: Optional[Sequence[str]] = None, name: str = "custom",
                val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """A bundle from in-memory arrays: each split is ``(inputs, labels)`` with ``inputs`` a dict
    ``{modality: [N, ...]}`` (or a tuple in ``modalities`` order) and ``labels`` [N] ints."""
    first = train[0] if isinstance(train, (tuple, list)) and len(train) == 2 else None
    if modalities is None and isinstance(first, Mapping):
        modalities = list(first)
    splits_raw = {"train": train, "val": val, "test": test}
    if num_classes is None and class_names is None:
        ys = [np.asarray(v[1]) for v in splits_raw.values() if v is not None]
        num_classes = int(max(int(y.max()) for y in ys if y.size)) + 1
    mods, k = _declared(modalities, num_classes, class_names)
    splits: Dict[str, Optional[MultimodalDataset]] = {}
    for s, value in splits_raw.items():
        if value is None:
            splits[s] = None
            continue
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise DataError(f"split '{s}': expected (inputs, labels), got {type(value).__name__}")
        x, y = value
        if isinstance(x, Mapping):
            if set(x) != set(mods):
                raise DataError(f"split '{s}': inputs have keys {list(x)}, expected {mods}")
            x = {m: x[m] for m in mods}
        elif isinstance(x, (tuple, list)) and len(x) == len(mods):
            x = dict(zip(mods, x))
        else:
            raise DataError(f"split '{s}': inputs must be a dict {{modality: array}} or a tuple of {len(mods)} arrays")
        y = np.asarray(y)
        if y.ndim != 1:
            raise DataError(f"split '{s}': labels must be 1-D [N], got shape {list(y.shape)}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"split '{s}': labels must hold integers, got dtype {y.dtype}")
        bad = np.flatnonzero((y < 0) | (y >= k))
        if len(bad):
            raise DataError(f"split '{s}', sample {int(bad[0])}: label {int(y[bad[0]])} is outside 0..{k - 1}")
        tensors = {}
        for m, a in x.items():
            t = _as_tensor(a, f"split '{s}', modality '{m}'")
            if t.dim() == 0 or t.shape[0] != len(y):
                raise DataError(f"split '{s}', modality '{m}': {t.shape[0] if t.dim() else 0} rows but {len(y)} labels")
            if t.is_floating_point() and not torch.isfinite(t).all():
                row = int((~torch.isfinite(t.reshape(len(y), -1))).any(1).nonzero()[0])
                raise DataError(f"split '{s}', modality '{m}': NaN or inf at sample {row}")
            tensors[m] = t
        splits[s] = TensorMultimodalDataset(tensors, y, k, keep_dtype=True)
    return _bundle(name, mods, k, splits, class_names, val_fraction, seed)


@register_dataset("custom", description="your own data handed to the Trainer from Python "
                  "(mmbalance.data.from_datasets / from_arrays); recorded as data.name custom:<name>")
def build_custom(options=None, data_cfg=None, seed: int = 0) -> DataBundle:
    name = getattr(data_cfg, "name", "custom")
    raise DataError(f"data.name '{name}': this run's data was handed in from Python and cannot be rebuilt "
                    f"from a config; pass it again from Python: Trainer(cfg, out, data=..., model=...).fit(resume=True)")
