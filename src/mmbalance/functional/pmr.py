"""PMR (Fan et al., CVPR 2023) -- the stateless math: prototype similarities, prototype momentum,
the weak-modality coefficients and the optional prototype-entropy term.

Everything here works on tiny tensors and is tested by hand in ``tests/methods/test_pmr.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def prototype_logits(features: Tensor, prototypes: Tensor, eps: float = 1e-12) -> Tensor:
    """``s[i, k] = -||z_i - c_k||_2`` ([B, K]); the plain (not squared) Euclidean distance, as the
    code's ``EU_dist``, with ``eps`` added inside the square root so the gradient at ``z == c``
    is finite (the code's is NaN there). ``prototypes`` are constants (detached)."""
    diff = features.unsqueeze(1) - prototypes.detach().to(features.dtype).unsqueeze(0)  # B, K, d
    return -(diff.pow(2).sum(-1) + eps).sqrt()


def momentum_prototypes(new: Tensor, previous: Tensor | None, momentum: float,
                        counts: Tensor | None = None) -> Tensor:
    """``c = (1 - mu) c_new + mu c_prev`` (the code's ``momentum_coef``); no previous
    prototypes -> ``c_new``. A class with ``counts == 0`` (unseen in the prototype pass) keeps its
    previous prototype (the code divides 0/0 and gets NaN); with no previous one it stays 0."""
    if previous is None:
        return new.clone()
    prev = previous.to(new.device, new.dtype)
    out = (1.0 - momentum) * new + momentum * prev
    if counts is not None:
        unseen = (counts.to(new.device) == 0).unsqueeze(1)
        out = torch.where(unseen, prev, out)
    return out


def ratios(scores: Sequence[Tensor] | Tensor) -> Tensor:
    """``rho_m = score_m / mean_{j != m} score_j`` ([M]); for M = 2 ``score_a / score_v`` and its
    inverse, as the code's ``ratio_a_p``."""
    s = torch.as_tensor(scores) if not isinstance(scores, Tensor) else scores
    s = s.double() if s.dtype != torch.float64 else s
    m = s.numel()
    others = (s.sum() - s) / (m - 1)
    return s / others


def weak_coefficients(rho: Tensor, alpha: float, coef: str = "binary") -> Tensor:
    """The prototype-CE weight of every modality ([M]).

    ``binary`` (the code): ``alpha`` for a modality with ``rho < 1`` (the weaker one), 0 otherwise
    (``rho == 1`` -> 0 for both, as the code's ``else`` branch).
    ``ratio`` (*not from the code*; the paper's ratio-dependent coefficient as recalled):
    ``alpha * (1 / rho - 1)`` clipped to ``[0, alpha]`` -- 0 for the stronger modality."""
    if coef == "binary":
        return torch.where(rho < 1, torch.full_like(rho, alpha), torch.zeros_like(rho))
    if coef == "ratio":
        return (alpha * (1.0 / rho - 1.0)).clamp(0.0, alpha)
    raise ValueError(f"coef must be 'binary' or 'ratio', got '{coef}'")


def entropy(logits: Tensor) -> Tensor:
    """Mean over rows of the entropy of ``softmax(logits)`` (natural log)."""
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(1).mean()
