"""DI-MML's pieces (Fan et al., ACM MM 2024), as pure functions.

* :func:`dimension_accuracy` -- per feature dimension, the accuracy of "nearest class mean in this
  one dimension" (``get_indices`` of the code, vectorised);
* :func:`top_dimensions` / :func:`exclusive_dimensions` -- dimensions above the mean accuracy, and
  those only one modality has (``top_m`` minus every other modality's);
* :func:`detached_infonce` -- ``mean_i -log softmax_j(<q_i, k_j> / tau)[i]`` with the keys
  detached (raw dot products, no normalisation);
* :func:`duc_loss` -- the dimension-unidirectional contrastive loss: every other modality learns
  modality m's exclusive dimensions from m (M = 2: the code's two terms);
* :func:`confidence_ensemble` -- ``sum_k softmax_k(c_k / T) o_k`` with ``c_k = max softmax(o_k)``,
  per sample (the stage-2 prediction).

Spec: ``baselines.md`` §4.22 (code fanyunfeng-bit/DI-MML@83b9b7a, ``main_CFT.py``,
``main_CFT_stage2.py``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def dimension_accuracy(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``acc[d] = mean_i [argmin_k |z_{i,d} - mu[k, d]| = y_i]`` [d], with ``mu`` the class means
    of ``features`` [N, d] itself. A class without rows is never the nearest (its mean is +inf).
    Ties go to the lower class index (as ``argmin``)."""
    z = features.detach().double()
    y = labels.long().to(z.device)
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=num_classes).to(z.dtype)
    mu = sums / counts.clamp_min(1.0)[:, None]
    mu[counts == 0] = float("inf")
    hits = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    for start in range(0, z.shape[0], 1024):  # [rows, K, d] at a time
        zc, yc = z[start:start + 1024], y[start:start + 1024]
        nearest = (zc[:, None, :] - mu[None, :, :]).abs().argmin(dim=1)  # [rows, d]
        hits += (nearest == yc[:, None]).double().sum(dim=0)
    return hits / max(1, z.shape[0])


def top_dimensions(accuracy: Tensor) -> Tensor:
    """Boolean mask of the dimensions whose accuracy is above the mean over dimensions."""
    return accuracy > accuracy.mean()


def exclusive_dimensions(tops: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``E_m = top_m`` minus the union of every other modality's ``top_j`` (boolean masks of one
    length). M = 2: the code's ``A = top_a \\ top_v``, ``V = top_v \\ top_a``."""
    names = list(tops)
    out = {}
    for m in names:
        others = torch.zeros_like(tops[m], dtype=torch.bool)
        for j in names:
            if j != m:
                others |= tops[j].bool()
        out[m] = tops[m].bool() & ~others
    return out


def detached_infonce(query: Tensor, key: Tensor, tau: float) -> Tensor:
    """``mean_i -log[exp(<q_i, k_i>/tau) / sum_j exp(<q_i, k_j>/tau)]`` with ``key`` detached."""
    logits = query @ key.detach().T / tau
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def duc_loss(features: Mapping[str, Tensor], exclusive: Mapping[str, Tensor], tau: float) -> Tensor:
    """``sum_m sum_{j != m} InfoNCE(z_j[:, E_m], z_m[:, E_m].detach())`` over the modalities whose
    exclusive set ``E_m`` is non-empty (an empty set is skipped: spec DECISION; the code would add
    ``log B``). M = 2 gives the code's two terms (visual learns the audio-exclusive dims and
    vice versa)."""
    names = list(features)
    ref = next(iter(features.values()))
    total = ref.new_zeros(())
    for m in names:
        mask = exclusive[m].to(ref.device).bool()
        if not bool(mask.any()):
            continue
        key = features[m][:, mask]
        for j in names:
            if j != m:
                total = total + detached_infonce(features[j][:, mask], key, tau)
    return total


def confidence_ensemble(logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Per sample: ``w = softmax_k(c_k / T)``, ``c_k = max softmax(o_k)``; returns ``sum_k w_k o_k``."""
    stack = torch.stack(list(logits))  # [P, B, K]
    conf = stack.softmax(dim=-1).max(dim=-1).values  # [P, B]
    w = (conf / temperature).softmax(dim=0)
    return (w[..., None] * stack).sum(dim=0)
