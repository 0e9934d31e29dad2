"""Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020): the weight estimate and the blended loss.

Spec ``baselines.md`` §4.5 (tsai's rule: mean losses, clamps). Pure tensor math, no model.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

#: the clamp of the generalisation gain / overfitting ratio (tsai, peer)
EPS = 1e-8


def blend_weights(lt1: Tensor, lv1: Tensor, lt2: Tensor, lv2: Tensor, eps: float = EPS) -> Dict[str, Tensor]:
    """Per-head weights from mean train / held-out losses at the start (``lt1``, ``lv1``) and end
    (``lt2``, ``lv2``) of an estimation window, each ``[K]`` (one entry per head):

    ``dG = max(0, lv1 - lv2)`` (generalisation gain), ``dO = (lv2 - lt2) - (lv1 - lt1)`` (growth
    of the overfitting gap), ``raw = max(eps, dG / max(eps, dO**2))``, ``w = raw / sum(raw)``.

    Returns ``{"weights", "raw", "dG", "dO"}`` (float64)."""
    lt1, lv1, lt2, lv2 = (torch.as_tensor(x, dtype=torch.float64) for x in (lt1, lv1, lt2, lv2))
    if not lt1.shape == lv1.shape == lt2.shape == lv2.shape or lt1.dim() != 1:
        raise ValueError(f"the four loss vectors must be 1-D of one length, got shapes "
                         f"{[tuple(x.shape) for x in (lt1, lv1, lt2, lv2)]}")
    dg = (lv1 - lv2).clamp_min(0.0)
    do = (lv2 - lt2) - (lv1 - lt1)
    raw = (dg / (do * do).clamp_min(eps)).clamp_min(eps)
    return {"weights": raw / raw.sum(), "raw": raw, "dG": dg, "dO": do}


def blended_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """``sum_k w_k L_k / sum_k w_k`` (tsai's form; equal to ``sum_k w_k L_k`` for normalised
    weights). ``losses``: ``[K]`` (differentiable), ``weights``: ``[K]`` constants."""
    w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    return (w * losses).sum() / w.sum()
