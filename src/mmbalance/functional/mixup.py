"""Multimodal Mixup (MM) and Balanced Multimodal Mixup (B-MM), as pure functions.

Paper: Ma, Ding, Chen, "Mixup Helps Understanding Multimodal Video Better" (MM Eq. 3, B-MM Eqs. 5-8); spec §3.1.
Stateful use (per-epoch rho, warm-up) lives in :mod:`mmbalance.methods.mixup`.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .scores import modality_scores


def sample_lambda(mode: str, value: float, gamma: float) -> float:
    """MM's mixing coefficient: ``value`` when ``mode == "fixed"``, else one draw of
    ``Beta(gamma, gamma)`` (Eq. 3) from torch's global RNG (seeded per epoch by the trainer)."""
    if mode == "fixed":
        return float(value)
    if mode == "beta":
        g = torch.tensor(float(gamma))
        return float(torch.distributions.Beta(g, g).sample())
    raise ValueError(f"lambda mode must be 'fixed' or 'beta', got '{mode}'")


def mix_features(features: Mapping[str, Tensor], perm: Tensor, lambdas: Mapping[str, float]) -> Dict[str, Tensor]:
    """``z~_m = lam_m z_m + (1 - lam_m) z_m[perm]`` for every modality in ``lambdas``; the others
    are returned untouched. ``lam_m`` is the weight of the row's **own** feature (Eq. 3's lambda;
    for B-MM see :func:`own_weight`). Differentiable through both ``z_m`` and ``z_m[perm]``."""
    out = {}
    for m, z in features.items():
        if m in lambdas:
            lam = float(lambdas[m])
            out[m] = lam * z + (1.0 - lam) * z[perm]
        else:
            out[m] = z
    return out


def mixed_cross_entropy(logits: Tensor, labels: Tensor, perm: Tensor, lam: float) -> Tensor:
    """``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])`` (batch means): the soft-label CE
    with target ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``; ``lam`` weights the row's own
    label, as in :func:`mix_features`."""
    return lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, labels[perm])


def mixed_targets(labels: Tensor, perm: Tensor, lam: float, num_classes: int) -> Tensor:
    """The soft labels ``lam * onehot(y) + (1 - lam) * onehot(y[perm])`` [B, K]."""
    eye = torch.eye(num_classes, device=labels.device)
    return lam * eye[labels] + (1.0 - lam) * eye[labels[perm]]


def score_sums(modality_logits: Mapping[str, Tensor], labels: Tensor) -> Tensor:
    """Eq. 5 summed over the rows: ``[sum_i softmax(l^m_i)[y_i] for m]`` as one float64 vector
    (modalities in the order of ``modality_logits``), ready for :func:`all_reduce_sum`."""
    with torch.no_grad():
        s = modality_scores({m: l.float() for m, l in modality_logits.items()}, labels)
        return torch.stack([v.double() for v in s.values()])


def discrepancy(sums: Mapping[str, float | Tensor]) -> Dict[str, float]:
    """Eq. 6: ``rho_m = S_m / S_other``. For M > 2 (extension) the "other" is the strongest of
    the remaining modalities, ``rho_m = S_m / max_{k != m} S_k``: the strongest modality's rho is
    its ratio to the runner-up (> 1), every other modality's is its ratio to the strongest (<= 1)."""
    vals = {m: float(v) for m, v in sums.items()}
    out = {}
    for m, s in vals.items():
        denom = max(v for k, v in vals.items() if k != m)
        out[m] = s / denom if denom > 0 else (math.inf if s > 0 else 1.0)
    return out


def bmm_lambdas(rho: Mapping[str, float], alpha: float) -> Dict[str, float]:
    """Eqs. 7-8: the modalities to mix and Eq. 7's lambda (which side it weights:
    :func:`own_weight`). When the strongest modality has
    ``rho > 1``: ``lam = tanh(alpha * rho_strong)`` for every other modality (``rho <= 1``); the
    strongest is not mixed. Nothing is mixed when no modality has ``rho > 1`` ("0 otherwise" =
    no mixing, spec §3.1.2 item 3)."""
    if not rho:
        return {}
    strong = max(rho, key=lambda m: rho[m])
    r = rho[strong]
    if not r > 1.0:
        return {}
    lam = math.tanh(alpha * r) if math.isfinite(r) else 1.0
    return {m: lam for m, v in rho.items() if m != strong and v <= 1.0}


def own_weight(lam: float, lambda_weights: str) -> float:
    """The weight of the sample's **own** feature and label in a B-MM mix, from Eq. 7's
    ``lam = tanh(alpha rho)``. ``lambda_weights="partner"`` (default reading): ``lam`` weights the
    partner, so the own weight is ``1 - lam``; ``"own"`` (Eq. 8 as printed): ``lam`` itself.
    The same weight goes to the feature (:func:`mix_features`) and to the label
    (:func:`mixed_cross_entropy`), so the target always puts on each sample the share that
    sample has in the mixed feature."""
    if lambda_weights == "partner":
        return 1.0 - float(lam)
    if lambda_weights == "own":
        return float(lam)
    raise ValueError(f"lambda_weights must be 'partner' or 'own', got '{lambda_weights}'")


def random_permutation(n: int, device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None) -> Tensor:
    """The batch partner ``perm[i]`` of every row (``torch.randperm``)."""
    return torch.randperm(n, generator=generator).to(device)
