"""UMT's feature distillation and UME's ensemble average (Du et al., ICML 2023).

* :func:`distillation_loss` -- ``weight * sum_m MSE(z_m, t_m)``, each MSE the mean over the
  ``B * d_m`` elements; the teacher features ``t_m`` are detached (stop-gradient);
* :func:`ensemble_log_probs` -- the log of the mean of the members' softmax probabilities
  (``log(mean_m softmax(l_m))``, clamped at 1e-12 before the log), the ensemble's prediction;
* :func:`alone` -- a features dict in which only modality ``m`` is kept and every other modality
  is a zero row of its feature size (how a unimodal model uses the fused classifier, as the
  ``unimodal`` method).

Spec: ``baselines.md`` §4.11 (no official code; peer GeWu-Lab/BalanceBenchmark@4c1482f
``balancemm/trainer/UMT_trainer.py``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], weight: float) -> Tensor:
    """``weight * sum_m mean((z_m - t_m)^2)`` over the modalities of ``teacher``."""
    missing = [m for m in teacher if m not in student]
    if missing:
        raise KeyError(f"no student features for modalities {missing}")
    total = None
    for m, t in teacher.items():
        z = student[m]
        if z.shape != t.shape:
            raise ValueError(f"modality '{m}': student features {list(z.shape)} and teacher features "
                             f"{list(t.shape)} differ in shape")
        term = F.mse_loss(z, t.detach().to(z.dtype), reduction="mean")
        total = term if total is None else total + term
    if total is None:
        raise ValueError("distillation_loss needs at least one modality")
    return weight * total


def ensemble_log_probs(logits: Mapping[str, Tensor]) -> Tensor:
    """``log(mean_m softmax(l_m))`` ``[B, K]`` (probabilities clamped at 1e-12)."""
    probs = torch.stack([l.softmax(dim=1) for l in logits.values()]).mean(0)
    return probs.clamp_min(1e-12).log()


def alone(z: Tensor, m: str, feature_dims: Mapping[str, int]) -> dict[str, Tensor]:
    """``{k: z if k == m else zeros [B, d_k]}`` for every modality of ``feature_dims``."""
    return {k: (z if k == m else z.new_zeros(z.shape[0], int(d))) for k, d in feature_dims.items()}
