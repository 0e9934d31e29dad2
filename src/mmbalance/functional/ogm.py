"""OGM-GE's modulation coefficients and GE noise (Peng et al., CVPR 2022), as pure functions.

* :func:`discrepancy_ratio_tensor` / :func:`ogm_coefficient_tensor` -- rho and the coefficients
  as ``[M]`` tensors on the scores' device (no host synchronisation; what the method uses);
  :func:`discrepancy_ratios` / :func:`ogm_coefficients_from_scores` / :func:`ogm_coefficients`
  give the same by modality name, as floats.
* :func:`ge_seed` / :func:`ge_generator` -- the per-step generator of the GE noise.
* :func:`modulate_gradient` -- ``grad * k`` (+ ``N(0, std(grad) + 1e-8)`` noise for GE), with the
  std kept as a tensor and the noise drawn on the gradient's device.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping

import torch
from torch import Tensor

from .scores import modality_scores


def discrepancy_ratio_tensor(scores: Tensor) -> Tensor:
    """``rho_m = s_m / mean_{j != m} s_j`` for a ``[M]`` tensor of scores (``inf`` where that
    mean is 0), on the scores' device, in float32. With two modalities this is OGM-GE's
    ``ratio_v = score_v / score_a`` and ``ratio_a = 1 / ratio_v``."""
    s = scores.detach().float()
    n = s.numel()
    if n < 2:
        raise ValueError(f"OGM needs at least two modality scores, got {n}")
    others = (s.sum() - s) / (n - 1)
    return torch.where(others > 0, s / others, torch.full_like(s, math.inf))


def ogm_coefficient_tensor(scores: Tensor, alpha: float) -> Tensor:
    """``k_m = 1 - tanh(alpha rho_m)`` where ``rho_m > 1`` (the dominant modality), else 1, as a
    ``[M]`` tensor on the scores' device (no host synchronisation; what the method uses)."""
    rho = discrepancy_ratio_tensor(scores)
    return torch.where(rho > 1.0, 1.0 - torch.tanh(alpha * rho), torch.ones_like(rho))


def _by_name(fn, scores: Mapping[str, float | Tensor], *args) -> Dict[str, float]:
    names = list(scores)
    values = fn(torch.tensor([float(scores[m]) for m in names]), *args)
    return dict(zip(names, values.tolist()))


def discrepancy_ratios(scores: Mapping[str, float | Tensor]) -> Dict[str, float]:
    """:func:`discrepancy_ratio_tensor` by modality name, as floats (logging, tests)."""
    return _by_name(discrepancy_ratio_tensor, scores)


def ogm_coefficients_from_scores(scores: Mapping[str, float | Tensor], alpha: float) -> Dict[str, float]:
    """:func:`ogm_coefficient_tensor` by modality name, as floats."""
    return _by_name(ogm_coefficient_tensor, scores, alpha)


def ogm_coefficients(modality_logits: Mapping[str, Tensor], labels: Tensor, alpha: float) -> Dict[str, float]:
    """Coefficients from per-modality logits (W-split with b/M for concat fusion)."""
    with torch.no_grad():
        return ogm_coefficients_from_scores(modality_scores(modality_logits, labels), alpha)


def ge_seed(seed: int, step: int) -> int:
    """The GE noise seed of training step ``step`` of a run seeded ``seed`` (same on every
    process): ``(seed * 1_000_003 + step * 7919 + 101) mod 2**62``."""
    return (int(seed) * 1_000_003 + int(step) * 7919 + 101) % (2 ** 62)


def ge_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with :func:`ge_seed` (the streams of CPU and CUDA
    generators differ; each is reproducible)."""
    return torch.Generator(device=torch.device(device)).manual_seed(ge_seed(seed, step))


def modulate_gradient(grad: Tensor, coeff: float | Tensor, noise: bool, generator: torch.Generator | None = None) -> Tensor:
    """OGM: ``grad * k``; OGM-GE: ``grad * k + N(0, std(grad) + 1e-8)`` (std of the unscaled grad,
    as the authors' ``parms.grad = parms.grad * k + zeros_like(grad).normal_(0, grad.std() + 1e-8)``).

    ``coeff`` may be a 0-d tensor; the std stays a tensor and the noise is drawn on
    ``grad.device`` in ``grad.dtype`` from ``generator`` (which must live on that device), so
    nothing is copied to or read back from the host. A one-element gradient has std 0 here (the
    sample std is undefined), i.e. noise std 1e-8."""
    out = grad * coeff
    if noise:
        std = grad.std() if grad.numel() > 1 else grad.new_zeros(())
        z = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
        out = out + z * (std + 1e-8)
    return out
