"""Data Remixing's per-sample assignment and per-row feature keeping (Ma, Chen, Deng, ICML 2025).

* :func:`kl_to_uniform` -- ``KL_i = sum_k p_ik log2(p_ik / (1/K))`` with ``p = softmax(logits)``
  clipped to ``[1e-9, 1]`` (the code's ``kl_divergence``; base-2 logarithm);
* :func:`assign_modalities` -- each sample to the modality it is LEAST confident on,
  ``argmin_m KL_m``; ties go to the later modality (the code: audio if ``KL_a < KL_v`` else video);
* :func:`keep_rows` -- features with, in each row, every modality but the assigned one replaced
  by zeros (rows assigned ``-1`` keep all);
* :func:`remix_order` -- the epoch's index order: each subset shuffled, subsets one after the
  other (``order="subsets"``: later modalities first, i.e. the code's video subset then audio
  subset for (audio, visual)), or everything shuffled together (``order="interleave"``).

Spec: ``baselines.md`` §4.24 (code MatthewMaxy/Remix_ICML2025@80898aa, ``train.py``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import Tensor


def kl_to_uniform(logits: Tensor, num_classes: int | None = None) -> Tensor:
    """``[B]`` KL divergence (bits) of each row's softmax from the uniform over ``K`` classes
    (``K`` = the logits' width unless given; the code hard-codes 6 for CREMA-D)."""
    k = logits.shape[1] if num_classes is None else int(num_classes)
    p = logits.detach().float().softmax(dim=1).clamp(1e-9, 1.0)
    return (p * torch.log2(p * k)).sum(dim=1)


def assign_modalities(kl: Tensor) -> Tensor:
    """``[B]`` long: per row the index (column of ``kl`` ``[B, M]``) of the smallest KL; ties to
    the later column."""
    m = kl.shape[1]
    return (m - 1) - torch.argmin(kl.flip(1), dim=1)


def keep_rows(features: Mapping[str, Tensor], keep: Tensor, modalities: Sequence[str]) -> Dict[str, Tensor]:
    """Row i keeps only modality ``modalities[keep[i]]`` (``keep[i] = -1``: all modalities)."""
    out = {}
    for j, m in enumerate(modalities):
        z = features[m]
        row = ((keep == j) | (keep < 0)).to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        out[m] = z * row
    return out


def remix_order(assign: Tensor, num_modalities: int, generator: torch.Generator, order: str = "subsets") -> List[int]:
    """The epoch's training order from the per-index assignment (``-1``: unassigned, last)."""
    assign = assign.cpu()
    n = assign.numel()
    if order == "interleave":
        return torch.randperm(n, generator=generator).tolist()
    if order != "subsets":
        raise ValueError(f"order must be 'subsets' or 'interleave', got '{order}'")
    out: List[int] = []
    for j in list(range(num_modalities - 1, -1, -1)) + [-1]:
        idx = torch.nonzero(assign == j).view(-1)
        if idx.numel():
            out.extend(idx[torch.randperm(idx.numel(), generator=generator)].tolist())
    return out
