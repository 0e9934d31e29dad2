"""What a dataset declares (modalities, classes, splits) and the dataset registry.

A dataset builder is registered with ``@register_dataset(name, options=OptionsDataclass, ...)``
and called as ``builder(options, data_cfg, seed) -> DataBundle``. Only dataset code spells out
modality names; everything else reads ``bundle.modalities``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import Registry
from .batch import Sample

SPLITS = ("train", "val", "test")


class MultimodalDataset(Dataset):
    """Base class: subclasses implement ``__len__``, ``get_inputs(i)`` and ``labels``."""

    modalities: Tuple[str, ...] = ()
    num_classes: int = 0

    @property
    def labels(self) -> np.ndarray:  # [N] int64
        raise NotImplementedError

    def get_inputs(self, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        return {"inputs": self.get_inputs(i), "label": int(self.labels[i]), "index": i}


class TensorMultimodalDataset(MultimodalDataset):
    """In-memory tensors: ``inputs[m]`` is [N, ...] for every modality."""

    def __init__(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor | np.ndarray, num_classes: int,
                 keep_dtype: bool = False):
        """``keep_dtype``: keep integer inputs (token ids) as they are; otherwise all float32."""
        self.inputs = {m: (torch.as_tensor(x) if keep_dtype else torch.as_tensor(x, dtype=torch.float32))
                       for m, x in inputs.items()}
        self._labels = np.asarray(labels, dtype=np.int64)
        self.modalities = tuple(self.inputs)
        self.num_classes = int(num_classes)
        n = len(self._labels)
        for m, x in self.inputs.items():
            if x.shape[0] != n:
                raise ValueError(f"modality '{m}' has {x.shape[0]} rows but there are {n} labels")

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def get_inputs(self, i: int) -> Dict[str, torch.Tensor]:
        return {m: x[i] for m, x in self.inputs.items()}


@dataclass
class DataBundle:
    """A dataset with its three splits and what the model needs to know about it."""

    name: str
    modalities: Tuple[str, ...]
    num_classes: int
    splits: Dict[str, MultimodalDataset]
    class_names: Optional[List[str]] = None
    #: per-sample input shape of each modality (picks the encoder)
    input_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    #: encoder choice suggested by the dataset (e.g. {"audio": "resnet18"}); config overrides it
    encoder_hints: Dict[str, str] = field(default_factory=dict)
    #: the training split with evaluation transforms (for statistic passes); defaults to train
    train_eval: Optional[MultimodalDataset] = None
    #: samples skipped under data.on_error=skip: dicts with split, index/clip, reason
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    #: "registry" (built from the config) or "python" (handed to the trainer by the user)
    origin: str = "registry"
    #: statistics fitted on the data (e.g. standardisation), plain dicts of tensors; saved with a run
    transform_state: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"dataset '{self.name}' lacks split(s) {missing}")
        if self.train_eval is None:
            self.train_eval = self.splits["train"]
        if not self.input_shapes:
            sample = self.splits["train"][0]
            self.input_shapes = {m: tuple(sample["inputs"][m].shape) for m in self.modalities}

    @property
    def train(self) -> MultimodalDataset:
        return self.splits["train"]

    @property
    def val(self) -> MultimodalDataset:
        return self.splits["val"]

    @property
    def test(self) -> MultimodalDataset:
        return self.splits["test"]

    def summary(self) -> str:
        sizes = ", ".join(f"{s}={len(self.splits[s])}" for s in SPLITS)
        shapes = ", ".join(f"{m}{list(self.input_shapes[m])}" for m in self.modalities)
        return f"{self.name}: {self.num_classes} classes, modalities {shapes}; {sizes}"


DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")


def register_dataset(name: str, *, description: str, options: Optional[type] = None,
                     presets: Optional[Dict[str, Any]] = None, modalities: Sequence[str] = (),
                     needs_root: bool = False):
    """Register a dataset builder.

    ``options``: dataclass of dataset-specific options (``data.<field>=...`` on the CLI).
    ``presets``: config overrides applied for this dataset before the user's (epochs, lr, ...).
    """
    return DATASETS.register(name, description=description, options=options, presets=presets or {},
                             modalities=tuple(modalities), needs_root=needs_root)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out), stratified by label, deterministic in ``seed``.

    Every class with at least 2 samples gives ``round(fraction * n_c)`` (at least 1) samples.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


class Subset(MultimodalDataset):
    """A view of some rows of a dataset (indices are re-numbered 0..n-1)."""

    def __init__(self, base: MultimodalDataset, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.modalities = base.modalities
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    def get_inputs(self, i: int) -> Dict[str, torch.Tensor]:
        return self.base.get_inputs(int(self.indices[i]))
