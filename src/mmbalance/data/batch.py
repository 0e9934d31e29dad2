"""Samples and batches. Modalities are dictionary keys, in the dataset's declared order."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, TypedDict

import torch
from torch import Tensor


class Sample(TypedDict):
    """One dataset item: ``inputs`` maps modality -> tensor; ``label`` and ``index`` are ints.
    A training sample drawn from a method's tagged sampler entry ``(index, tag)`` also carries
    ``tag`` (an int; absent = untagged, collated as -1)."""

    inputs: Dict[str, Tensor]
    label: int
    index: int


#: ``Batch.tag`` of a row whose sampler entry carried no tag (and of every evaluation row)
NO_TAG = -1


@dataclass
class Batch:
    inputs: Dict[str, Tensor]
    labels: Tensor  # [B] int64
    index: Tensor  # [B] int64, position in the split's dataset
    #: [B] int64: the tag of each row's sampler entry ``(index, tag)`` (``Method.sampler``), -1 when
    #: untagged; filled with -1 when not given
    tag: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.tag is None:
            self.tag = torch.full((int(self.labels.shape[0]),), NO_TAG, dtype=torch.long,
                                  device=self.labels.device)

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
            self.tag.to(device, non_blocking=non_blocking),
        )

    def select(self, rows: Tensor) -> "Batch":
        """The sub-batch of the given row indices (or boolean mask)."""
        return Batch({m: x[rows] for m, x in self.inputs.items()}, self.labels[rows], self.index[rows],
                     self.tag[rows])

    def with_inputs(self, inputs: Mapping[str, Tensor]) -> "Batch":
        return replace(self, inputs=dict(inputs))

    def pin_memory(self) -> "Batch":
        return Batch({m: x.pin_memory() for m, x in self.inputs.items()}, self.labels.pin_memory(),
                     self.index.pin_memory(), self.tag.pin_memory())


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
    tag = torch.tensor([int(s.get("tag", NO_TAG)) for s in samples], dtype=torch.long)
    return Batch(inputs, labels, index, tag)
