"""CGGM's pure math (spec baselines §4.25): the accuracy-change coefficients, the direction
cosines and the gradient-modulation loss ``l_gm``. Stateless; see :mod:`mmbalance.methods.cggm`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: the code's additive guard in the denominator
EPS = 1e-8
#: below this total accuracy change the coefficients are undefined: every coefficient is 1 (DECISION)
FLAT = 1e-6


def coefficients(acc: Tensor, acc_prev: Tensor, guard: bool = True, lo: float = 0.0, hi: float = 2.0) -> Tensor:
    """``coeff_m = (sum_j d_j - d_m) / (sum_j d_j + 1e-8)`` with ``d = acc - acc_prev`` (the code).

    ``guard`` (the spec's DECISION): ``coeff_m = 1`` for every m when ``|sum_j d_j| < 1e-6``
    (undefined ratio), else clipped to ``[lo, hi]`` (no sign flip, bounded amplification).
    ``guard=False``: the code's raw values. Float64 for the ratio; returns ``acc``'s dtype. No host
    read: the flat case is selected with ``torch.where``."""
    d = acc.double() - acc_prev.to(device=acc.device, dtype=torch.float64)
    total = d.sum()
    c = (total - d) / (total + EPS)
    if guard:
        c = torch.where(total.abs() < FLAT, torch.ones_like(c), c.clamp(lo, hi))
    return c.to(acc.dtype)


def direction_cosines(aux_weights: Sequence[Tensor], fusion_weights: Sequence[Tensor]) -> Tensor:
    """``cos_m = cosine(flat(aux_weights[m]), flat(fusion_weights[m]))`` -- differentiable in both
    (detach what must not receive a gradient before calling). Returns ``[M]``."""
    if len(aux_weights) != len(fusion_weights):
        raise ValueError(f"need one fusion weight per auxiliary weight, got {len(aux_weights)} and "
                         f"{len(fusion_weights)}")
    out = []
    for a, f in zip(aux_weights, fusion_weights):
        if a.numel() != f.numel():
            raise ValueError(f"cannot compare weights of {a.numel()} and {f.numel()} entries (shapes "
                             f"{list(a.shape)} and {list(f.shape)})")
        out.append(F.cosine_similarity(a.reshape(-1).float(), f.reshape(-1).float(), dim=0))
    return torch.stack(out)


def gm_loss(coeff: Tensor, cos: Tensor) -> Tensor:
    """``l_gm = (sum_m |coeff_m| - sum_m coeff_m cos_m) / M`` (the coefficients are constants)."""
    c = coeff.detach().to(cos.dtype)
    return (c.abs().sum() - (c * cos).sum()) / c.numel()
