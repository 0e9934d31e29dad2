"""MLA's math (Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal
Adaptation", CVPR 2024), as pure functions.

* :func:`projector_alpha` -- ``alpha = 0.1 ** (1 + batch_idx / num_batches)`` (``GSPlugin``).
* :func:`owm_update` -- the OWM-style projector update ``k = P r^T``,
  ``P <- P - k k^T / (alpha + r k)``, ``P <- P / ||P||_F``.
* :func:`project_gradient` -- ``grad <- grad P^T`` (the shared head's ``[K, d]`` weight gradient).
* :func:`entropy_gates` / :func:`gated_logits` -- test-time fusion ``sum_m w_m l_m`` with
  ``w_m = exp(H_max - H_m) / sum_j exp(H_max - H_j)`` (= softmax over modalities of ``-H``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def projector_alpha(batch_idx: int, num_batches: int, base: float = 0.1) -> float:
    """``base ** (1 + batch_idx / num_batches)``: from 0.1 at the first batch of an epoch towards
    0.01 at its end (``GSPlugin.before_update``)."""
    return float(base ** (1.0 + batch_idx / max(1, num_batches)))


def owm_update(P: Tensor, r: Tensor, alpha: float, denominator: str = "owm", normalise: bool = True) -> Tensor:
    """One projector update with the (row) input ``r`` (``[d]`` or ``[1, d]``).

    ``k = P r^T`` (``[d, 1]``); ``denominator="owm"``: ``P - k k^T / (alpha + r k)`` (the scalar
    of OWM and the MLA paper); ``"code"``: ``P - k k^T / (alpha + k r)`` where ``k r`` is the
    ``[d, d]`` outer product divided element-wise, as literally written in the authors'
    ``GSPlugin`` (``torch.mm(k, r)``). Then ``P / ||P||_F`` when ``normalise``."""
    r = r.reshape(1, -1).to(P.dtype)
    k = P @ r.t()
    if denominator == "owm":
        den = alpha + (r @ k)  # [1, 1]
    elif denominator == "code":
        den = alpha + k @ r  # [d, d]
    else:
        raise ValueError(f"denominator must be 'owm' or 'code', got '{denominator}'")
    out = P - (k @ k.t()) / den
    if normalise:
        out = out / torch.linalg.matrix_norm(out, ord="fro")
    return out


def project_gradient(grad: Tensor, P: Tensor) -> Tensor:
    """``grad @ P^T`` for a ``[K, d]`` weight gradient and a ``[d, d]`` projector."""
    return grad @ P.to(grad.dtype).t()


def entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (natural log) of ``softmax(logits)`` along ``dim``."""
    logp = logits.float().log_softmax(dim=dim)
    return -(logp.exp() * logp).sum(dim=dim)


def entropy_gates(logits: Sequence[Tensor], scope: str = "sample") -> Tensor:
    """Gates ``w_m ∝ exp(H_max - H_m)`` for per-modality logits ``[B, K]`` each.

    ``scope="sample"``: per-sample entropies over classes -> ``[M, B]`` weights (paper).
    ``scope="batch"``: the authors' ``calculate_entropy`` -- softmax over the *batch* dimension
    (``dim=0``) and the entropy summed over the whole ``[B, K]`` tensor, one scalar per modality
    -> ``[M, 1]`` weights broadcast over the batch."""
    if scope == "sample":
        h = torch.stack([entropy(l, dim=1) for l in logits])  # [M, B]
    elif scope == "batch":
        h = torch.stack([entropy(l, dim=0).sum() for l in logits]).unsqueeze(1)  # [M, 1]
    else:
        raise ValueError(f"scope must be 'sample' or 'batch', got '{scope}'")
    w = torch.exp(h.max(dim=0, keepdim=True).values - h)
    return w / w.sum(dim=0, keepdim=True)


def gated_logits(logits: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_m w_m * l_m`` with ``weights`` ``[M, B]``, ``[M, 1]`` or ``[M]``."""
    stacked = torch.stack([l.float() for l in logits])  # [M, B, K]
    w = weights.float()
    while w.dim() < stacked.dim():
        w = w.unsqueeze(-1)
    return (w * stacked).sum(0)


def fixed_weights(num: int, weights: Optional[Sequence[float]] = None) -> Tensor:
    """Fixed fusion weights: the given ones, else uniform ``1/M`` (the code's ``av_alpha=0.5``)."""
    if weights:
        return torch.tensor([float(w) for w in weights])
    return torch.full((num,), 1.0 / num)
