"""OGM-GE's modulation coefficients (Peng et al., CVPR 2022), as pure functions."""
from __future__ import annotations

import math
from typing import Dict, Mapping

import torch
from torch import Tensor

from .scores import modality_scores


def discrepancy_ratios(scores: Mapping[str, float | Tensor]) -> Dict[str, float]:
    """rho_m = score_m / mean_{j != m} score_j. With two modalities this is OGM-GE's
    ``ratio_v = score_v / score_a`` and ``ratio_a = 1 / ratio_v``."""
    vals = {m: float(s) for m, s in scores.items()}
    out = {}
    for m, s in vals.items():
        others = [v for k, v in vals.items() if k != m]
        denom = sum(others) / len(others)
        out[m] = s / denom if denom > 0 else math.inf
    return out


def ogm_coefficients_from_scores(scores: Mapping[str, float | Tensor], alpha: float) -> Dict[str, float]:
    """k_m = 1 - tanh(alpha * rho_m) for a modality with rho_m > 1 (the dominant one), else 1."""
    rho = discrepancy_ratios(scores)
    return {m: (1.0 - math.tanh(alpha * r)) if r > 1.0 else 1.0 for m, r in rho.items()}


def ogm_coefficients(modality_logits: Mapping[str, Tensor], labels: Tensor, alpha: float) -> Dict[str, float]:
    """Coefficients from per-modality logits (W-split with b/M for concat fusion)."""
    with torch.no_grad():
        return ogm_coefficients_from_scores(modality_scores(modality_logits, labels), alpha)


def modulate_gradient(grad: Tensor, coeff: float, noise: bool, generator: torch.Generator | None = None) -> Tensor:
    """OGM: ``grad * k``; OGM-GE: ``grad * k + N(0, std(grad) + 1e-8)`` (std of the unscaled grad)."""
    out = grad * coeff
    if noise:
        std = float(grad.std()) + 1e-8 if grad.numel() > 1 else 1e-8
        out = out + torch.randn(grad.shape, generator=generator, dtype=grad.dtype).to(grad.device) * std
    return out
