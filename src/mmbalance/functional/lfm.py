"""LFM's schedule and alignment term (Yang, Wan, Jiang, Xu, NeurIPS 2024), as pure functions.

* :func:`heuristic_alpha1` -- the code's fitted quintic ``alpha1(e)`` (``getAlpha_Learnable_Fitted``)
  with the epoch rescaled to the 200-epoch run it was fitted on and the result clamped to [0, 1];
* :func:`mean_pairwise_js` -- ``JS(softmax(o_a), softmax(o_v))`` (batchmean, natural log); for M > 2
  the mean over the M(M-1)/2 modality pairs;
* :func:`lfm_loss` -- ``scale * (alpha1 * L_cls + (1 - alpha1) * L_align)`` (code: scale 2);
* learnable alpha (``Crema_epoch_learnable.py::getAlpha_Learnable``): :func:`alpha_hypergradient`
  (the mean over the FIRST parameter tensor of the Hessian-vector product
  ``H(alpha1 L_cls + alpha2 L_align) . grad L_cls``), :func:`learnable_lr` (halved every 20
  epochs) and :func:`update_alpha2` (``clip(alpha2 - lr * g, 0.05, 0.95)``).

Spec: ``baselines.md`` §4.13 (code njustkmg/NeurIPS24-LFM@ad44fa0, ``Crema_epoch.py``,
``Crema_epoch_learnable.py``).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .common import js_divergence

#: coefficients of alpha1(e) = sum_i c_i e^i, the code's fit over a 200-epoch CREMA-D run
HEURISTIC_COEFFS = (0.204623704, 3.35472727e-3, 1.22989557e-4, -2.92947416e-6, 2.23835486e-8, -5.39717505e-11)
#: the run length the polynomial was fitted on
FIT_EPOCHS = 200


def heuristic_polynomial(e: float) -> float:
    """The raw fitted quintic at (possibly fractional) epoch ``e`` (no rescaling, no clamp)."""
    return sum(c * e ** i for i, c in enumerate(HEURISTIC_COEFFS))


def heuristic_alpha1(epoch: int, num_epochs: int = FIT_EPOCHS, rescale: bool = True) -> float:
    """``clamp(poly(e'), 0, 1)`` with ``e' = epoch * 200 / num_epochs`` when ``rescale`` (spec
    DECISION), else ``e' = epoch`` (the code's values for a 200-epoch run either way)."""
    e = float(epoch)
    if rescale and num_epochs > 0:
        e = e * FIT_EPOCHS / num_epochs
    return min(1.0, max(0.0, heuristic_polynomial(e)))


def mean_pairwise_js(logits: Mapping[str, Tensor]) -> Tensor:
    """Mean Jensen-Shannon divergence of the softmax predictions over all modality pairs."""
    names = list(logits)
    if len(names) < 2:
        raise ValueError(f"the alignment term needs at least two modalities, got {len(names)}")
    terms = [js_divergence(logits[a], logits[b]) for a, b in itertools.combinations(names, 2)]
    return torch.stack(terms).mean()


def lfm_loss(loss_cls: Tensor, loss_align: Tensor, alpha1: float, scale: float = 2.0) -> Tensor:
    """``scale * (alpha1 L_cls + (1 - alpha1) L_align)``."""
    return scale * (alpha1 * loss_cls + (1.0 - alpha1) * loss_align)


#: the code's bounds of alpha2 in the learnable variant
ALPHA2_BOUNDS = (0.05, 0.95)


def alpha_hypergradient(loss_cls: Tensor, loss_align: Tensor, alpha1: float, params: Sequence[Tensor]) -> float:
    """The learnable variant's signal: ``mean(HVP[0])`` with
    ``HVP = grad_theta < grad_theta(alpha1 L_cls + (1 - alpha1) L_align), v >`` and
    ``v = grad_theta L_cls`` held constant (a Hessian-vector product of the weighted loss with the
    classification gradient), restricted to the first tensor of ``params`` as the code
    (``hessian_vector_prod[0].mean()``). Both losses must be built from ``params`` with autograd on.
    A parameter a loss does not reach contributes zeros."""
    params = list(params)
    if not params:
        raise ValueError("alpha_hypergradient needs at least one parameter tensor")
    total = alpha1 * loss_cls + (1.0 - alpha1) * loss_align
    g_total = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    g_cls = torch.autograd.grad(loss_cls, params, retain_graph=True, allow_unused=True)
    outs, vecs = [], []
    for gt, gc in zip(g_total, g_cls):
        if gt is not None and gc is not None and gt.requires_grad:
            outs.append(gt)
            vecs.append(gc.detach())
    if not outs:
        return 0.0
    hvp = torch.autograd.grad(outs, params[:1], grad_outputs=vecs, allow_unused=True)[0]
    return 0.0 if hvp is None else float(hvp.double().mean())


def learnable_lr(epoch: int, lr0: float, halve_every: int = 20) -> float:
    """The code's alpha step size at ``epoch``: ``lr0`` halved at every positive multiple of
    ``halve_every`` (before that epoch's update), i.e. ``lr0 / 2 ** (epoch // halve_every)``."""
    if halve_every <= 0:
        return float(lr0)
    return float(lr0) * 0.5 ** (int(epoch) // int(halve_every))


def update_alpha2(alpha2: float, hypergrad: float, lr: float, bounds=ALPHA2_BOUNDS) -> float:
    """``clip(alpha2 - lr * hypergrad, 0.05, 0.95)`` (alpha1 = 1 - alpha2)."""
    lo, hi = bounds
    return min(hi, max(lo, float(alpha2) - float(lr) * float(hypergrad)))
