"""AGM's math (Li et al., ICCV 2023; spec baselines §4.4), stateless and tiny-tensor testable.

* :func:`shapley_logits` -- Shapley decomposition of the fused logits over modality subsets with
  the empty-set value taken as 0 (so ``sum_m phi_m == total``, as the authors' code);
* :func:`shapley_scores` -- ``s_m = mean_i -log max(softmax(phi_m)_i[y_i], 1e-8)``;
* :func:`agm_ratios` -- ``r_m = exp(M / (M - 1) * (mean_j s_j - s_m))``;
* :func:`agm_coefficients` -- ``c_m = exp(alpha * min(rbar_m - r_m, cap))``;
* :func:`running_mean` -- ``sbar <- sbar (it - 1) / it + s / it`` (``it`` 1-based);
* :func:`scale_grad` -- identity forward, gradient times ``c`` backward (the code's full
  backward hook on an identity module).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .common import all_subsets, shapley_combine


def shapley_logits(values: Mapping[frozenset, Tensor], players: Sequence[str]) -> Dict[str, Tensor]:
    """``phi_m`` from the logits of every non-empty subset (``values[frozenset(players)]`` is the
    full model's output). The empty subset's value is 0 whatever ``values`` holds for it."""
    full = frozenset(players)
    like = values[full]
    vals = {s: (torch.zeros_like(like) if not s else values[s]) for s in all_subsets(players)}
    return shapley_combine(vals, players)


def shapley_scores(phi: Mapping[str, Tensor], labels: Tensor, floor: float = 1e-8,
                   reduce: bool = True) -> Dict[str, Tensor]:
    """Per-modality cross-entropy of the Shapley logits with the code's floor on the true-class
    probability; batch mean (``reduce``) or per-row [B]."""
    out = {}
    for m, l in phi.items():
        p = l.detach().float().softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
        ce = -p.clamp_min(floor).log()
        out[m] = ce.mean() if reduce else ce
    return out


def agm_ratios(scores: Tensor) -> Tensor:
    """``r_m = exp(M / (M - 1) * (mean_j s_j - s_m))`` for a score vector [M] (M >= 2)."""
    m = scores.numel()
    return torch.exp(m / (m - 1) * (scores.mean() - scores))


def agm_coefficients(ratios: Tensor, mean_ratios: Tensor, alpha: float, cap: Optional[float]) -> Tensor:
    """``c_m = exp(alpha * min(rbar_m - r_m, cap))`` (no cap when ``cap`` is None)."""
    d = mean_ratios - ratios
    if cap is not None:
        d = d.clamp_max(cap)
    return torch.exp(alpha * d)


def running_mean(mean: Tensor, value: Tensor, it: int) -> Tensor:
    """The code's cumulative mean over all steps: ``mean (it - 1) / it + value / it``."""
    return mean * (it - 1) / it + value / it


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(c)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (c,) = ctx.saved_tensors
        return g * c.to(g.dtype), None


def scale_grad(x: Tensor, c: Tensor | float) -> Tensor:
    """``x`` unchanged in the forward pass; its incoming gradient is multiplied by ``c``."""
    c = torch.as_tensor(c, device=x.device).detach()
    return _ScaleGrad.apply(x, c)
