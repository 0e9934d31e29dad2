"""MLB's gradient-modulation coefficients (Kontras et al., BMVC 2024), as pure functions.

* :func:`mlb_scores` -- ``s_m = mean_i softmax(h_m)_i[y_i]`` (batch mean of the true-class
  probability of modality m's own unimodal head), detached, float32;
* :func:`mlb_ratios` -- ``r_m = mean_{j != m} s_j / s_m`` (M = 2: ``r_a = s_v / s_a``);
* :func:`mlb_coefficients` -- ``k_m = 1 + tanh(alpha (r_m - 1))`` (``tanh_mode=1``), or with
  ``tanh_mode=2`` the boost of a weak modality (``r_m > 1``) capped at ``beta``:
  ``k_m = 1 + (beta - 1) tanh(alpha (r_m - 1))``; the damping branch (``r_m <= 1``) is the same in
  both modes.

Spec: ``baselines.md`` §4.17 (code kkontras/MLB@357b5ce, ``Bias_Infusion_MLB._equalize_gradients``).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .scores import true_class_prob


def mlb_scores(head_logits: Mapping[str, Tensor], labels: Tensor) -> Tensor:
    """``[M]`` float32 tensor of batch-mean true-class probabilities, in ``head_logits`` order."""
    with torch.no_grad():
        return torch.stack([true_class_prob(h.detach().float(), labels).mean() for h in head_logits.values()])


def mlb_ratios(scores: Tensor) -> Tensor:
    """``r_m = mean_{j != m} s_j / s_m`` for a ``[M]`` score tensor (a zero score is floored at
    1e-12, so a modality that predicts nothing right gets a very large ratio, i.e. the full boost)."""
    s = scores.detach().float()
    n = s.numel()
    if n < 2:
        raise ValueError(f"MLB needs at least two modality scores, got {n}")
    others = (s.sum() - s) / (n - 1)
    return others / s.clamp_min(1e-12)


def mlb_coefficients(scores: Tensor, alpha: float, tanh_mode: int = 1, beta: float = 2.0) -> Tensor:
    """``k_m`` (``[M]``, float32) from the ``[M]`` scores; see the module docstring."""
    r = mlb_ratios(scores)
    t = torch.tanh(alpha * (r - 1.0))
    if tanh_mode == 1:
        return 1.0 + t
    if tanh_mode == 2:
        return torch.where(r > 1.0, 1.0 + (beta - 1.0) * t, 1.0 + t)
    raise ValueError(f"tanh_mode must be 1 or 2, got {tanh_mode}")
