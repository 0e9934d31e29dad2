"""Fusion modules: features dict -> fused logits, and per-modality logits from the same weights.

Every fusion implements ``forward(features) -> logits [B, K]`` and
``modality_logits(features) -> {m: [B, K]}``:

* ``concat`` -- ``Linear(sum d_m, K)`` on the concatenation. Per-modality logits are the W-split
  ``z_m W_m^T + b/M`` (OGM-GE, B-MM Eq. 5, GMM Eq. 3); they sum to the fused logits exactly.
* ``sum`` -- one ``Linear(d_m, K)`` per modality, fused = sum; per-modality = each branch (sums
  exactly).
* ``late`` -- decision fusion: one classifier per modality, fused = mean of their logits;
  per-modality = each branch (their mean is the fused logits).
* ``film`` -- FiLM (Perez et al. 2018, OGM-GE's ``FiLM``): the last modality is modulated,
  ``gamma, beta = Linear(cat(other features))``, logits ``= Linear(gamma * z_last + beta)``.
  OGM-GE conditions on one modality; with M > 2 we condition on the concatenation of all the
  others. Per-modality logits = zero-out (all other features replaced by zeros).
* ``gated`` -- gated multimodal unit (Arevalo et al. 2017): ``h_m = tanh(W_m z_m)``, gates
  ``softmax_m(V_m cat(z))`` per hidden unit, fused ``= Linear(sum_m g_m * h_m)``. OGM-GE's
  two-modality ``GatedFusion`` (sigmoid gate from one modality on the other) is asymmetric; the
  GMU is its symmetric M-modality form. Per-modality logits = zero-out.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import Tensor, nn

from ..registry import Registry

FUSIONS: Registry[type] = Registry("fusion")


def zero_out(features: Mapping[str, Tensor], keep: str) -> Dict[str, Tensor]:
    """All features except ``keep`` replaced by zeros (the OGM-GE / MIDAS probe)."""
    return {m: (z if m == keep else torch.zeros_like(z)) for m, z in features.items()}


class Fusion(nn.Module):
    #: True when sum over modalities of ``modality_logits`` equals the fused logits
    additive: bool = False

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int = 128):
        super().__init__()
        self.modalities = list(dims)
        self.dims = dict(dims)
        self.num_classes = num_classes

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def modality_logits(self, features: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {m: self(zero_out(features, m)) for m in self.modalities}


@FUSIONS.register("concat", description="concatenate features, one linear classifier (W-split per-modality logits)")
class ConcatFusion(Fusion):
    additive = True

    def __init__(self, dims, num_classes, hidden=128):
        super().__init__(dims, num_classes, hidden)
        self.fc = nn.Linear(sum(self.dims.values()), num_classes)

    def forward(self, features):
        return self.fc(torch.cat([features[m] for m in self.modalities], dim=1))

    def weight_blocks(self) -> Dict[str, Tensor]:
        """W_m: the columns of the classifier that multiply modality m's feature."""
        out, start = {}, 0
        for m in self.modalities:
            out[m] = self.fc.weight[:, start:start + self.dims[m]]
            start += self.dims[m]
        return out

    def modality_logits(self, features):
        w = self.weight_blocks()
        b = self.fc.bias / len(self.modalities)
        return {m: features[m] @ w[m].t() + b for m in self.modalities}


class _Branches(Fusion):
    def __init__(self, dims, num_classes, hidden=128):
        super().__init__(dims, num_classes, hidden)
        self.branches = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.dims.items()})

    def modality_logits(self, features):
        return {m: self.branches[m](features[m]) for m in self.modalities}


@FUSIONS.register("sum", description="one linear layer per modality, logits summed")
class SumFusion(_Branches):
    additive = True

    def forward(self, features):
        return torch.stack([self.branches[m](features[m]) for m in self.modalities]).sum(0)


@FUSIONS.register("late", description="decision fusion: per-modality classifiers, logits averaged")
class LateFusion(_Branches):
    def forward(self, features):
        return torch.stack([self.branches[m](features[m]) for m in self.modalities]).mean(0)


@FUSIONS.register("film", description="FiLM: the last modality modulated by the others")
class FiLMFusion(Fusion):
    def __init__(self, dims, num_classes, hidden=128):
        super().__init__(dims, num_classes, hidden)
        *cond, self.target = self.modalities
        self.cond = cond
        d_t = self.dims[self.target]
        self.film = nn.Linear(sum(self.dims[m] for m in cond), 2 * d_t)
        self.fc = nn.Linear(d_t, num_classes)

    def forward(self, features):
        gamma, beta = self.film(torch.cat([features[m] for m in self.cond], 1)).chunk(2, dim=1)
        return self.fc(gamma * features[self.target] + beta)


@FUSIONS.register("gated", description="gated multimodal unit: softmax gates over modalities per hidden unit")
class GatedFusion(Fusion):
    def __init__(self, dims, num_classes, hidden=128):
        super().__init__(dims, num_classes, hidden)
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in self.dims.items()})
        self.gate = nn.Linear(sum(self.dims.values()), hidden * len(self.modalities))
        self.fc = nn.Linear(hidden, num_classes)
        self.hidden = hidden

    def forward(self, features):
        h = torch.stack([torch.tanh(self.proj[m](features[m])) for m in self.modalities], 1)  # B,M,H
        g = self.gate(torch.cat([features[m] for m in self.modalities], 1)).view(h.shape).softmax(dim=1)
        return self.fc((g * h).sum(1))


def build_fusion(name: str, dims: Mapping[str, int], num_classes: int, hidden: int = 128) -> Fusion:
    cls = FUSIONS.get(name)
    if name == "film" and len(dims) < 2:
        from ..errors import ConfigError
        raise ConfigError("FiLM fusion needs at least 2 modalities")
    return cls(dims, num_classes, hidden)
