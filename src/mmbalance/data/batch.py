"""Samples and batches. Modalities are dictionary keys, in the dataset's declared order."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Sequence, TypedDict

import torch
from torch import Tensor


class Sample(TypedDict):
    """One dataset item: ``inputs`` maps modality -> tensor; ``label`` and ``index`` are ints."""

    inputs: Dict[str, Tensor]
    label: int
    index: int


@dataclass
class Batch:
    inputs: Dict[str, Tensor]
    labels: Tensor  # [B] int64
    index: Tensor  # [B] int64, position in the split's dataset

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modalities(self) -> List[str]:
        return list(self.inputs)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            {m: x.to(device, non_blocking=non_blocking) for m, x in self.inputs.items()},
            self.labels.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
        )

    def select(self, rows: Tensor) -> "Batch":
        """The sub-batch of the given row indices (or boolean mask)."""
        return Batch({m: x[rows] for m, x in self.inputs.items()}, self.labels[rows], self.index[rows])

    def with_inputs(self, inputs: Mapping[str, Tensor]) -> "Batch":
        return replace(self, inputs=dict(inputs))

    def pin_memory(self) -> "Batch":
        return Batch({m: x.pin_memory() for m, x in self.inputs.items()}, self.labels.pin_memory(),
                     self.index.pin_memory())


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`; every sample must have the same modalities and shapes."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    mods = list(samples[0]["inputs"])
    inputs = {}
    for m in mods:
        try:
            inputs[m] = torch.stack([s["inputs"][m] for s in samples])
        except KeyError:
            bad = next(s["index"] for s in samples if m not in s["inputs"])
            raise ValueError(f"sample {bad} has no input for modality '{m}'") from None
        except RuntimeError:
            shapes = {tuple(s["inputs"][m].shape) for s in samples}
            raise ValueError(f"modality '{m}': samples in one batch have different shapes {sorted(shapes)}") from None
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    index = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return Batch(inputs, labels, index)
