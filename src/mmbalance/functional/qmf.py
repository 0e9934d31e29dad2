"""QMF's dynamic fusion weights and confidence-ranking loss (Zhang et al., ICML 2023), pure functions.

* :func:`energy_weights` -- ``w = scale * logsumexp(l, dim=1)`` (= ``-scale * energy``), ``[B, 1]``,
  NOT detached (the code's ``QMF.forward``);
* :func:`qmf_fuse` -- ``fused = sum_m w_m * l_m`` and the weights;
* :func:`minmax_normalise` -- ``(h - min h) / (max h - min h)`` over the whole history row (zeros
  when the row is constant, e.g. before any update);
* :func:`rank_loss` -- the ranking term on the pairs ``(i, j = roll(i, -1))`` of a batch, from the
  confidences ``w`` and the normalised cumulative losses ``h`` of the rows: with
  ``t = sign(h_i - h_j)`` (``t = 1``: row i is the LESS reliable one),
  ``margin="slack"`` (the code): ``max(0, t (w_i - w_j) - |h_i - h_j|)``,
  ``margin="crl"`` (CRL's intent): ``max(0, t (w_i - w_j) + |h_i - h_j|)``; 0 where ``t = 0``;
  mean over the B pairs.

Spec: ``baselines.md`` §4.18 (code QingyangZhang/QMF@fe6c4c6, ``train_QMF_nyud2.py::rank_loss``,
``utils/crl_utils.py::History``).
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor


def energy_weights(logits: Tensor, scale: float = 0.1) -> Tensor:
    """``scale * logsumexp(logits, dim=1)`` as ``[B, 1]`` (differentiable)."""
    return scale * torch.logsumexp(logits, dim=1, keepdim=True)


def qmf_fuse(logits: Mapping[str, Tensor], scale: float = 0.1) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``(sum_m w_m l_m, {m: w_m [B, 1]})``."""
    weights = {m: energy_weights(l, scale) for m, l in logits.items()}
    fused = torch.stack([weights[m] * l for m, l in logits.items()]).sum(0)
    return fused, weights


def minmax_normalise(h: Tensor) -> Tensor:
    """Min-max normalisation over the whole tensor; all zeros when it is constant."""
    lo, hi = h.min(), h.max()
    span = hi - lo
    return torch.where(span > 0, (h - lo) / span.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))


def rank_loss(w: Tensor, h: Tensor, margin: str = "slack") -> Tensor:
    """See the module docstring. ``w``: confidences ``[B]`` or ``[B, 1]``; ``h``: the rows'
    normalised cumulative losses ``[B]`` (detached)."""
    w = w.reshape(-1)
    h = h.reshape(-1).to(w.dtype)
    w_j, h_j = torch.roll(w, -1), torch.roll(h, -1)
    t = torch.sign(h - h_j)
    gap = (h - h_j).abs()
    if margin == "slack":
        raw = t * (w - w_j) - gap
    elif margin == "crl":
        raw = t * (w - w_j) + gap
    else:
        raise ValueError(f"margin must be 'slack' or 'crl', got '{margin}'")
    return torch.where(t != 0, raw.clamp_min(0.0), torch.zeros_like(raw)).mean()
