"""MMPareto's gradient integration (Wei & Hu, ICML 2024; spec baselines §4.9), stateless.

For one encoder with the multimodal-loss gradient ``g_mm`` and its unimodal-loss gradient ``g_u``
(flattened over the whole encoder):

* ``cos(g_mm, g_u) > 0``: weights ``(k1, k2) = (0.5, 0.5)``; otherwise the two-vector MinNorm
  weights ``(gamma*, 1 - gamma*)`` (:func:`mmbalance.functional.common.min_norm_2`);
* ``new = 2 (k1 g_mm + k2 g_u)``, ``tot = g_mm + g_u``, ``r = ||tot|| / ||new||`` (per parameter
  tensor, the code, or over the whole encoder, ``rescale="encoder"``);
* result ``gamma_scale * (r new if r > 1 else new)``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import min_norm_2


def _fp32(x: Tensor) -> Tensor:
    """Flat, in at least fp32 (fp64 input stays fp64)."""
    x = x.reshape(-1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def pareto_weights(g_mm: Tensor, g_u: Tensor, conflict: str = "minnorm") -> Tuple[Tensor, Tensor, Tensor]:
    """``(k1, k2, cos)`` for two flat vectors (0-d tensors; no host synchronisation).
    ``conflict="sum"``: always (0.5, 0.5) (no integration; the no-op configuration)."""
    a, b = _fp32(g_mm), _fp32(g_u)
    cos = F.cosine_similarity(a, b, dim=0, eps=1e-8)
    gamma, _ = min_norm_2(a, b)
    half = torch.full_like(gamma, 0.5)
    if conflict == "sum":
        k1 = half
    elif conflict == "minnorm":
        k1 = torch.where(cos > 0, half, gamma)
    else:
        raise ValueError(f"conflict must be 'minnorm' or 'sum', got '{conflict}'")
    return k1, 1 - k1, cos


def _rescale(new: Tensor, tot: Tensor) -> Tensor:
    """``r new`` if ``r = ||tot|| / ||new|| > 1`` else ``new`` (``new`` unchanged when it is 0)."""
    nn_, nt = new.norm(), tot.norm()
    r = torch.where(nn_ > 0, nt / nn_.clamp_min(1e-300), torch.zeros_like(nt))
    return torch.where(r > 1, r * new, new)


def integrate(g_mm: Tensor, g_u: Tensor, sizes: Sequence[int], scale: float = 1.5,
              rescale: str = "tensor", conflict: str = "minnorm") -> Tuple[Tensor, Tensor, Tensor]:
    """The integrated gradient of one encoder: flat ``g_mm``, ``g_u`` split into parameter tensors
    of ``sizes`` (their sum is the vector length). Returns ``(flat result, k1, cos)``."""
    a, b = _fp32(g_mm), _fp32(g_u)
    k1, k2, cos = pareto_weights(a, b, conflict)
    new = 2 * (k1 * a + k2 * b)
    tot = a + b
    if rescale == "encoder":
        out = _rescale(new, tot)
    elif rescale == "tensor":
        out = torch.cat([_rescale(n, t) for n, t in zip(new.split(list(sizes)), tot.split(list(sizes)))]) \
            if len(sizes) else new
    else:
        raise ValueError(f"rescale must be 'tensor' or 'encoder', got '{rescale}'")
    return scale * out, k1, cos
