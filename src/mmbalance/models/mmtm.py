"""MMTM, the multimodal transfer module (Joze et al., CVPR 2020), as used by Greedy (Wu et al.,
ICML 2022; nyukat/greedy_multimodal_learning@a190e03 ``src/balanced_mmtm.py::MMTM_mitigate``).

For two modalities with stage outputs ``F_0`` ([B, C_0, ...]) and ``F_1`` ([B, C_1, ...])::

    sq_m = mean of F_m over every axis but batch and channels          # [B, C_m]
    e    = relu(fc_squeeze(cat(sq_0, sq_1)))                            # C_0+C_1 -> 2(C_0+C_1)/ratio
    g_m  = sigmoid(fc_excite[m](e))                                     # [B, C_m]
    F_m <- F_m * g_m (broadcast over the other axes)

Greedy's additions, kept here because they live inside the forward:

* ``running_gate_{i}`` (buffers): the cumulative mean over training forwards of the batch-mean
  gate of modality ``i``, ``avg <- (mean_b g_i + avg * n) / (n + 1)``, detached (reduced across
  processes under DDP, so every replica holds the same average); ``steps`` counts the updates.
* ``caring`` (set by the method for one forward, never saved): in curation mode the caring
  modality's gate is replaced by its running average (after this forward's update, as the code
  does) -- a constant over the batch, so no sample-specific information flows from the other
  modality into that branch, and no gradient reaches ``fc_excite[caring]`` / ``fc_squeeze``
  through it.
* ``squeeze_override`` (set by the CUR evaluation, never saved): ``{i: [C_i]}`` replaces modality
  i's squeeze vector by a constant (its train-set mean) in the gates of the *other* modality,
  the code's ``turnoff_cross_modal_flow``; ``record`` (a list, or ``None``) collects the squeeze
  vectors of each forward for those means.

DECISIONS (spec §4.3): the running average of each modality uses that modality's own gate (the
code updates both with the first modality's gate -- ``fix_avg_bug=False`` in the method
reproduces it); the averages are updated in training forwards only (the code also updates them in
evaluation forwards, so evaluating would change training).

No host sync in a training forward: the update count ``steps`` enters the running average as a
device tensor (on CPU the same arithmetic as the Python int it was read into before; on CUDA the
division by ``steps + 1`` is now a true division where dividing by a Python int multiplied by its
float32 reciprocal, a difference of at most one ulp in the running gates).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_row_mean
from ..functional.greedy import excite, mmtm_gates, running_average, squeeze


class MMTM(nn.Module):
    """MMTM between two modalities (a cross-modal block of a
    :class:`~mmbalance.models.stages.StagedMultimodalModel`: ``{m: F_m} -> {m: F_m * g_m}``)."""

    def __init__(self, modalities: Sequence[str], channels: Sequence[int], ratio: float = 4.0,
                 channel_dims: Optional[Sequence[int]] = None, fix_avg_bug: bool = True):
        super().__init__()
        if len(modalities) != 2 or len(channels) != 2:
            raise ValueError(f"MMTM couples two modalities, got {list(modalities)}")
        if ratio <= 0:
            raise ValueError(f"MMTM ratio must be > 0, got {ratio}")
        self.modalities = list(modalities)
        self.channels = [int(c) for c in channels]
        self.channel_dims = list(channel_dims) if channel_dims is not None else [1, 1]
        dim = sum(self.channels)
        dim_out = max(1, int(2 * dim / ratio))
        self.fc_squeeze = nn.Linear(dim, dim_out)
        self.fc_excite = nn.ModuleList([nn.Linear(dim_out, c) for c in self.channels])
        for i, c in enumerate(self.channels):
            self.register_buffer(f"running_gate_{i}", torch.zeros(c))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.fix_avg_bug = bool(fix_avg_bug)
        self.caring: Optional[int] = None
        self.squeeze_override: Optional[Dict[int, Tensor]] = None
        self.record: Optional[List[List[Tensor]]] = None

    def running_gate(self, i: int) -> Tensor:
        return getattr(self, f"running_gate_{i}")

    def _gates(self, sq: List[Tensor]) -> List[Tensor]:
        return mmtm_gates(sq, self.fc_squeeze.weight, self.fc_squeeze.bias,
                          [f.weight for f in self.fc_excite], [f.bias for f in self.fc_excite])

    def forward(self, features: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        xs = [features[m] for m in self.modalities]
        sq = [squeeze(x, d) for x, d in zip(xs, self.channel_dims)]
        if self.record is not None:
            self.record.append([s.detach() for s in sq])
        if self.squeeze_override:
            gates = []
            for i in range(2):  # gate i sees its own squeeze and the other's constant
                other = 1 - i
                s = list(sq)
                if other in self.squeeze_override:
                    s[other] = self.squeeze_override[other].to(sq[other]).expand_as(sq[other])
                gates.append(self._gates(s)[i])
        else:
            gates = self._gates(sq)
        if self.training:
            n = self.steps  # the update count stays a device tensor (reading it would be a host sync)
            with torch.no_grad():
                means = [all_reduce_row_mean(g.float()) for g in gates]
                for i in range(2):
                    src = means[i] if self.fix_avg_bug else means[0]
                    if src.shape != self.running_gate(i).shape:
                        raise ValueError("fix_avg_bug=False needs equal channel counts (the code's buffers are "
                                         f"sized by the first modality): {self.channels}")
                    self.running_gate(i).copy_(running_average(self.running_gate(i), src, n))
                self.steps += 1
        if self.caring is not None:
            c = int(self.caring)
            gates[c] = self.running_gate(c).to(gates[c].dtype).expand_as(gates[c])
        return {m: excite(x, g, d) for m, x, g, d in zip(self.modalities, xs, gates, self.channel_dims)}
