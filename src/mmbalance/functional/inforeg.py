"""InfoReg's math (Huang et al., CVPR 2025; spec baselines §4.21), stateless.

* :func:`window_growth` -- the "prime learning window" test ``k = (T1 - T2) / T1`` with
  ``T1 = mean(tr[-w:])``, ``T2 = mean(tr[-w-1:-1])`` over a per-epoch Fisher-trace list;
* :func:`regulation_coefficients` -- ``beta_m = gamma_m exp(tanh(s_m - mean_{j != m} s_j))`` for
  every modality with ``s_m > mean_j s_j`` whose window is still open (M = 2: the code's rule);
* :func:`proximal_grad` -- ``beta (p - p_e)``, the gradient of ``beta / 2 ||p - p_e||^2``;
* :func:`fisher_trace` -- ``sum over layers of mean(F[layer])``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def window_growth(traces: Sequence[float], window: int = 10) -> float:
    """Relative growth of the mean trace over the last ``window`` epochs vs the window one epoch
    earlier. Needs ``len(traces) >= window + 1``. ``T1 == 0`` gives 0.0 (the code divides by
    zero: NaN, which fails the ``k > threshold`` test, i.e. no regulation -- the same)."""
    if len(traces) < window + 1:
        raise ValueError(f"window_growth needs at least {window + 1} traces, got {len(traces)}")
    t1 = sum(traces[-window:]) / window
    t2 = sum(traces[-window - 1:-1]) / window
    if t1 == 0:
        return 0.0
    return (t1 - t2) / t1


def regulation_coefficients(scores: Tensor, gammas: Tensor, open_window: Tensor) -> Tensor:
    """``beta`` [M] from the scores [M], per-modality constants [M] and a bool mask [M] of
    modalities whose prime-learning window is open."""
    m = scores.numel()
    mean_all = scores.mean()
    mean_others = (scores.sum() - scores) / (m - 1)
    beta = gammas * torch.exp(torch.tanh(scores - mean_others))
    active = (scores > mean_all) & open_window
    return torch.where(active, beta, torch.zeros_like(beta))


def proximal_grad(p: Tensor, p_e: Tensor, beta: Tensor | float) -> Tensor:
    """``beta (p - p_e)``."""
    return beta * (p - p_e)


def fisher_trace(fisher: Mapping[str, Tensor]) -> float:
    """``sum_layers mean(F[layer])`` (0.0 when empty)."""
    return float(sum(float(f.float().mean()) for f in fisher.values()))
