"""Small pieces of math several methods share (each tested once, in tests/test_common_math.py).

* :func:`js_divergence` -- Jensen-Shannon divergence of two logit tensors (MCR, PMR-style probes);
* :func:`shapley_combine` -- exact Shapley values of per-modality players from values of every
  subset (AGM's modality outputs, the Shapley diagnostic);
* :func:`min_norm_2` -- the closed-form min-norm point of the segment between two vectors
  (MGDA with two tasks; MMPareto);
* :func:`class_prototypes` -- per-class feature means (PMR).
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, FrozenSet, Mapping, Sequence, Tuple

import torch
from torch import Tensor


def js_divergence(logits_p: Tensor, logits_q: Tensor, clamp: float = 1e7) -> Tensor:
    """``0.5 * [KL(p || m) + KL(q || m)]``, ``p = softmax(logits_p)``, ``q = softmax(logits_q)``,
    ``m = (p + q) / 2`` clamped to >= 1e-20; natural log; summed over classes and averaged over
    rows (``batchmean``). Logits are clamped to +-``clamp`` first (as MCR's code).

    ``KL(p || m)`` is summed as ``p * (log_softmax - log m)``, not with ``F.kl_div``: a class whose
    probability underflows to exactly 0 in float32 (a very confident row) then contributes 0 with
    a finite gradient, where ``kl_div``'s ``xlogy`` backward gives NaN (it diverged MCR on the
    synthetic default at epoch 19)."""
    lp = logits_p.clamp(-clamp, clamp).float().log_softmax(dim=-1)
    lq = logits_q.clamp(-clamp, clamp).float().log_softmax(dim=-1)
    p, q = lp.exp(), lq.exp()
    log_m = (0.5 * (p + q)).clamp_min(1e-20).log()
    rows = max(int(logits_p.shape[0]), 1) if logits_p.dim() > 0 else 1
    return 0.5 * ((p * (lp - log_m)).sum() + (q * (lq - log_m)).sum()) / rows


def all_subsets(players: Sequence[str]) -> list:
    """Every subset of ``players`` (the empty one included) as frozensets, smallest first."""
    return [frozenset(c) for r in range(len(players) + 1) for c in itertools.combinations(players, r)]


def shapley_combine(values: Mapping[FrozenSet[str], Tensor], players: Sequence[str]) -> Dict[str, Tensor]:
    """Exact Shapley value of each player: ``phi_m = sum_{S ⊆ N \\ {m}} |S|! (M - |S| - 1)! / M!
    [v(S ∪ {m}) - v(S)]``. ``values`` maps every subset (frozenset of player names, the empty set
    included) to a tensor (e.g. logits [B, K]); the values sum to ``v(N) - v(∅)`` (efficiency)."""
    players = list(players)
    m_count = len(players)
    missing = [set(s) for s in all_subsets(players) if s not in values]
    if missing:
        raise KeyError(f"shapley_combine needs the value of every subset; missing {missing[:3]}")
    out = {}
    for m in players:
        others = [p for p in players if p != m]
        total = None
        for s in all_subsets(others):
            w = math.factorial(len(s)) * math.factorial(m_count - len(s) - 1) / math.factorial(m_count)
            term = w * (values[s | {m}] - values[s])
            total = term if total is None else total + term
        out[m] = total
    return out


def min_norm_2(g1: Tensor, g2: Tensor) -> Tuple[Tensor, Tensor]:
    """``gamma* = argmin_{gamma in [0, 1]} ||gamma g1 + (1 - gamma) g2||^2`` in closed form,
    ``gamma* = clamp((g2 - g1) . g2 / ||g1 - g2||^2, 0, 1)`` (0.5 when ``g1 == g2``); returns
    ``(gamma*, gamma* g1 + (1 - gamma*) g2)``. Flattened vectors of equal size."""
    a, b = g1.reshape(-1).double(), g2.reshape(-1).double()
    diff = a - b
    den = diff.dot(diff)
    gamma = torch.where(den > 0, ((b - a).dot(b) / den.clamp_min(1e-300)).clamp(0.0, 1.0),
                        torch.tensor(0.5, dtype=torch.float64, device=a.device))
    return gamma.to(g1.dtype), (gamma * a + (1 - gamma) * b).to(g1.dtype).reshape(g1.shape)


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Per-class means of ``features`` [N, d]: ``(prototypes [K, d], counts [K])``; a class with
    no rows gets a zero prototype and count 0 (callers decide what that means)."""
    f = features.detach().float()
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).to(f.device)
    return sums / counts.clamp_min(1).unsqueeze(1), counts
