"""SMV's sample-level modality valuation and re-sampling rules (Wei, Feng, Wang, Hu, CVPR 2024).

* :func:`subset_values` -- ``v(S) = |S| * [argmax fused(z_S) == y]`` per sample for every subset
  ``S`` of the modalities (features of the others zeroed), ``v(∅) = 0``;
* :func:`modality_contributions` -- the exact Shapley value of each modality from those values
  (for two modalities ``phi_a = (v_a + v_all - v_v) / 2``; the code's ``execute_modulation``);
* :func:`sample_copies` -- the number of extra copies of a sample that train modality m alone,
  from ``phi_m`` (the code's ``AV_KS_Dataset_sample_level``: ``0.4 < phi < 0.9`` -> 1,
  ``-0.1 < phi < 0.4`` -> 2, ``phi < -0.1`` -> 3, otherwise 0);
* :func:`sample_level_entries` -- the next epoch's ``(index, tag)`` list: every sample once with
  tag -1 (all modalities), then its copies with tag m (keep only modality m);
* :func:`modality_resample_fractions` -- the modality-level rule: ``gap_m = 1 - mean phi_m`` over
  a random part of the samples, ``delta = f(|gap_a - gap_v| * 2/3, alpha)`` (``linear``:
  ``* alpha``; ``tanh``: ``tanh(. * alpha)``; ``square``: ``(.)^1.5 * alpha``), all of it for the
  modality with the larger gap (the worse-contributing one, which the copies keep);
* :func:`modality_level_entries` -- every sample once, plus ``int(delta_m * N)`` indices drawn
  with replacement, tagged m.

Spec: ``baselines.md`` §4.8 (code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@7ed12b0,
``code/sample_level.py``, ``code/modality_level.py``, ``code/datasets/dataloader.py``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .common import all_subsets, shapley_combine

FUNCS = ("linear", "tanh", "square")


def subset_values(correct: Mapping[frozenset[str], Tensor]) -> dict[frozenset[str], Tensor]:
    """``{S: |S| * correct_S}`` (float) for every non-empty subset given, plus ``v(∅) = 0``;
    ``correct_S`` is a ``[B]`` bool/0-1 tensor: the fused prediction with only ``S`` kept is right."""
    vals = {s: len(s) * c.float() for s, c in correct.items() if len(s)}
    ref = next(iter(vals.values()))
    vals[frozenset()] = torch.zeros_like(ref)
    return vals


def modality_contributions(correct: Mapping[frozenset[str], Tensor], modalities: Sequence[str]) -> Tensor:
    """``[B, M]`` Shapley contribution of each modality per sample (columns in ``modalities``
    order) from the per-subset correctness (every non-empty subset needed)."""
    phi = shapley_combine(subset_values(correct), list(modalities))
    return torch.stack([phi[m] for m in modalities], dim=1)


def sample_copies(phi: Tensor) -> Tensor:
    """Extra copies per sample and modality (same shape as ``phi``, long): the code's strict
    thresholds ``0.4 < phi < 0.9`` -> 1, ``-0.1 < phi < 0.4`` -> 2, ``phi < -0.1`` -> 3, else 0
    (``phi`` = 0.4, -0.1 and every value >= 0.9 fall in no branch)."""
    p = phi if phi.is_floating_point() else phi.double()  # thresholds in phi's own precision
    out = torch.zeros(phi.shape, dtype=torch.long, device=phi.device)
    out[(p > 0.4) & (p < 0.9)] = 1
    out[(p > -0.1) & (p < 0.4)] = 2
    out[p < -0.1] = 3
    return out


def sample_level_entries(phi: Tensor) -> list[tuple[int, int]]:
    """``[(i, -1) for every sample] + [(i, m) per extra copy]`` (copies in sample order, then
    modality order, as the code appends them). ``phi`` is ``[N, M]``."""
    copies = sample_copies(phi.cpu())
    out = [(i, -1) for i in range(phi.shape[0])]
    for i, row in enumerate(copies.tolist()):
        for m, c in enumerate(row):
            out.extend([(i, m)] * c)
    return out


def resample_delta(gap_diff: float, alpha: float, func: str = "linear") -> float:
    """The code's ``difference`` from ``|gap_a - gap_v|``: ``d = gap_diff / 3 * 2``, then
    ``linear`` ``d * alpha``, ``tanh`` ``tanh(d * alpha)``, ``square`` ``d ** 1.5 * alpha``."""
    d = gap_diff / 3 * 2
    if func == "linear":
        return d * alpha
    if func == "tanh":
        return math.tanh(d * alpha)
    if func == "square":
        return d ** 1.5 * alpha
    raise ValueError(f"func must be one of {', '.join(FUNCS)}, got '{func}'")


def modality_resample_fractions(mean_phi: Tensor, alpha: float, func: str = "linear") -> Tensor:
    """``[M]`` fraction of the training set to append, per kept modality. ``gap_m = 1 - mean_phi_m``;
    two modalities: the one with the larger gap gets ``resample_delta(|gap_a - gap_v|)``, the other
    0 (a tie: the code keeps the second modality, with delta 0). M > 2 (extension): each modality
    m gets ``resample_delta(gap_m - min_j gap_j)`` -- for M = 2 exactly the two-modality rule."""
    gap = 1.0 - mean_phi.double().cpu()
    low = float(gap.min())
    out = torch.zeros(gap.shape[0], dtype=torch.float64)
    for m in range(gap.shape[0]):
        diff = float(gap[m]) - low
        if diff > 0:
            out[m] = resample_delta(diff, alpha, func)
    return out


def modality_level_entries(n: int, fractions: Tensor, generator: torch.Generator) -> list[tuple[int, int]]:
    """``[(i, -1) for i < n]`` plus, for each modality m, ``int(fractions[m] * n)`` indices drawn
    uniformly with replacement (``generator``), tagged m."""
    out = [(i, -1) for i in range(n)]
    for m, f in enumerate(fractions.tolist()):
        k = int(f * n)
        if k > 0:
            out.extend((int(i), m) for i in torch.randint(n, (k,), generator=generator).tolist())
    return out


def part_mean(phi: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """``[M]`` mean contribution over ``int(N * ratio)`` samples drawn with replacement (the code's
    ``np.random.choice(N, num)``); the mean over all samples when that is 0."""
    n = phi.shape[0]
    k = int(n * ratio)
    if k <= 0:
        return phi.double().mean(0)
    pick = torch.randint(n, (k,), generator=generator)
    return phi[pick].double().mean(0)


__all__ = [
    "FUNCS",
    "all_subsets",
    "modality_contributions",
    "modality_level_entries",
    "modality_resample_fractions",
    "part_mean",
    "resample_delta",
    "sample_copies",
    "sample_level_entries",
    "subset_values",
]
