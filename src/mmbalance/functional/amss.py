"""AMSS / AMSS+ (Yang et al., TPAMI 2025): modality coefficients and gradient subnet masks.

Spec ``baselines.md`` §4.23; code njustkmg/TPAMI-AMSS@3161ecc ``AMSS/train_test.py``
(``modal_caculate_MI``, the masking loop of ``train_epoch``).

* :func:`amss_label_entropy_term` -- the code's ``H_Y = CrossEntropyLoss(pi, pi)`` =
  ``-sum_k pi_k log softmax(pi)_k`` (class *probabilities* used as logits; not the label entropy),
  with ``pi`` the batch label frequencies over ``0..max(label)`` (``torch.bincount`` without
  ``minlength``, as the code);
* :func:`amss_feature_entropy` -- ``H_m = CrossEntropyLoss(z_m, softmax(z_m))``: the batch mean of
  the entropy of ``softmax`` over the *feature* dimensions;
* :func:`amss_coefficients` -- ``rho_m = (s_m + H_Y + 0.5) / H_m``, ``t_m = rho_m / T``,
  ``c_m = sum_{j != m} e^{t_j} / ((M - 1) sum_j e^{t_j})`` (M = 2: ``c_a = e^{t_v} / (e^{t_a} + e^{t_v})``),
  NaN -> 1/M, clamped to ``[lo, hi]``; ``1/M`` for all when some ``s_m + H_Y + 0.5 <= 0``;
* :func:`filter_importance` -- ``g_f = sum grad^2`` over every dimension but the first (the
  ``gn`` mode; ``sqrt_gn`` and ``gn_wn`` as the code's other modes);
* :func:`select_filters` / :func:`filter_mask` -- which filters keep their gradient, and the mask
  (1, or ``1 / (pi_f + 1/C)`` for AMSS+).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

SAMPLE_MODES = ("adaptive", "topk", "random", "bernoulli")
GN_MODES = ("gn", "sqrt_gn", "gn_wn")


def amss_label_entropy_term(counts: Tensor) -> Tensor:
    """``-sum pi log softmax(pi)`` with ``pi = counts / counts.sum()`` over classes
    ``0..last class with a non-zero count`` (the code's ``bincount`` length). 0-d float32 (NaN
    when every count is 0). Computed on the device with the classes after the last non-zero
    count masked out (``-inf`` logits, zero terms) -- the same value as slicing them off, without
    reading the last class back to the host."""
    c = counts.detach().float()
    pos = torch.arange(c.numel(), device=c.device)
    last = torch.where(c > 0, pos, torch.full_like(pos, -1)).max()
    keep = pos <= last
    pi = c / c.sum()
    logp = torch.log_softmax(pi.masked_fill(~keep, float("-inf")), dim=0)
    return -torch.where(keep, pi * logp, torch.zeros_like(pi)).sum()


def amss_feature_entropy(z: Tensor, reduction: str = "mean") -> Tensor:
    """Entropy of ``softmax(z)`` over the feature dimension, per row (``reduction="none"``),
    their mean (the code's ``CrossEntropyLoss(z, softmax(z))``) or sum."""
    logp = torch.log_softmax(z.float(), dim=1)
    h = -(logp.exp() * logp).sum(1)
    return {"mean": h.mean, "sum": h.sum, "none": lambda: h}[reduction]()


def amss_coefficients(scores: Tensor, h_y: Tensor | float, h_m: Tensor, temperature: float = 0.2,
                      lo: float = 0.1, hi: float = 0.9) -> Tuple[Tensor, Tensor]:
    """``(c, rho)`` as ``[M]`` float32 tensors from the scores ``s_m`` (batch-mean
    log-likelihoods), ``H_Y`` and the feature entropies ``H_m`` (see the module docstring)."""
    s = scores.detach().float()
    h = torch.as_tensor(h_m, dtype=torch.float32, device=s.device)
    hy = torch.as_tensor(h_y, dtype=torch.float32, device=s.device)
    n = s.numel()
    num = s + hy + 0.5
    rho = num / h
    e = torch.softmax(rho / temperature, dim=0)  # e^{t_m} / sum_j e^{t_j}
    c = (1.0 - e) / (n - 1)
    c = torch.where(torch.isnan(c), torch.full_like(c, 1.0 / n), c)
    # a non-positive numerator -> uniform 1/M and rho = 1 (torch.where: no host read of the test)
    fallback = (num <= 0).any()
    c = torch.where(fallback, torch.full_like(s, 1.0 / n), c)
    return c.clamp(lo, hi), torch.where(fallback, torch.ones_like(s), rho)


def filter_importance(grad: Tensor, weight: Optional[Tensor] = None, mode: str = "gn") -> Tensor:
    """Per-output-filter importance of a gradient ``[C, ...]``: ``sum grad^2`` over the other
    dimensions (``gn``), its square root (``sqrt_gn``) or divided by ``sum weight^2`` (``gn_wn``)."""
    g = grad.detach().float()
    gn = (g * g).reshape(g.shape[0], -1).sum(1)
    if mode == "gn":
        return gn
    if mode == "sqrt_gn":
        return gn.sqrt()
    if mode == "gn_wn":
        if weight is None:
            raise ValueError("gn_wn needs the weight")
        w = weight.detach().float()
        return gn / (w * w).reshape(w.shape[0], -1).sum(1)
    raise ValueError(f"gn mode must be one of {GN_MODES}, got '{mode}'")


def num_kept(num_filters: int, fraction: float | Tensor) -> int:
    """``ceil(C * c)`` (the code's conv rule)."""
    return min(num_filters, math.ceil(num_filters * float(fraction) - 1e-9))


def selection_stats(importance: Tensor) -> Tensor:
    """``[total > 0, number of filters with pi_f > 0]`` (float32, on the device): what
    :func:`select_filters` and :func:`filter_mask` read on the host. A method stacks these for all
    its layers and reads them in one transfer, then passes each pair as ``stats``."""
    imp = importance.detach().float()
    total = imp.sum()
    return torch.stack([(total > 0).float(), (imp / total > 0).sum().float()])


def select_filters(importance: Tensor, n: int, mode: str = "adaptive",
                   generator: Optional[torch.Generator] = None,
                   stats: Optional[Sequence[float]] = None) -> Tensor:
    """Indices of the filters whose gradient is kept.

    ``adaptive``: ``n`` filters sampled without replacement with probability proportional to
    the importance (when fewer than ``n`` filters have a non-zero importance, all of those: the
    others' gradients are zero, so their mask does not matter); ``topk``: the ``n`` largest;
    ``random``: ``n`` uniformly; ``bernoulli``: each filter with probability ``pi_f`` (ignores
    ``n``, as the code). ``stats``: :func:`selection_stats` of ``importance`` already read on
    the host (saves the two host reads here)."""
    imp = importance.detach().float()
    C = imp.numel()
    dev = generator.device if generator is not None else imp.device
    if mode == "topk":
        return torch.argsort(imp, descending=True)[:n]
    if mode == "random":
        return torch.randperm(C, generator=generator, device=dev)[:n].to(imp.device)
    total = imp.sum()
    positive = bool(stats[0]) if stats is not None else bool(total > 0)
    if not positive:
        return torch.arange(C, device=imp.device)
    pi = imp / total
    if mode == "bernoulli":
        return torch.nonzero(torch.bernoulli(pi.to(dev), generator=generator)).squeeze(1).to(imp.device)
    if mode != "adaptive":
        raise ValueError(f"sample mode must be one of {SAMPLE_MODES}, got '{mode}'")
    nonzero = int(stats[1]) if stats is not None else int((pi > 0).sum())
    if nonzero <= n:
        if nonzero == C:  # every filter (the common case): no data-dependent shape
            return torch.arange(C, device=imp.device)
        return torch.nonzero(pi > 0).squeeze(1)
    return torch.multinomial(pi.to(dev), n, replacement=False, generator=generator).to(imp.device)


def filter_mask(importance: Tensor, selected: Tensor, plus: bool = False,
                positive: Optional[bool] = None) -> Tensor:
    """``[C]`` mask: 1 on ``selected`` (AMSS) or ``1 / (pi_f + 1/C)`` (AMSS+, ``pi = importance /
    sum``), 0 elsewhere. ``positive``: ``importance.sum() > 0`` when already known on the host."""
    imp = importance.detach().float()
    C = imp.numel()
    mask = torch.zeros_like(imp)
    if plus:
        total = imp.sum()
        pi = imp / total if (positive if positive is not None else bool(total > 0)) else torch.zeros_like(imp)
        mask[selected] = 1.0 / (pi[selected] + 1.0 / C)
    else:
        mask[selected] = 1.0
    return mask


def amss_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of training step ``step``'s mask sampling (the same on every process, so
    replicas keep identical parameters): seeded ``(seed * 1_000_037 + step * 7933 + 307) mod 2**62``."""
    return torch.Generator(device=torch.device(device)).manual_seed((int(seed) * 1_000_037 + int(step) * 7933 + 307) % (2 ** 62))
