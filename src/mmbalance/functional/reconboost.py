"""ReconBoost's pure math (spec baselines §4.12): the stage/phase schedule, the boosting loss and
the reconcilement (GA) term. Stateless; see :mod:`mmbalance.methods.reconboost` for the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BOOST = "boost"
CORRECT = "correct"


@dataclass(frozen=True)
class Phase:
    """Where epoch ``epoch`` sits: stage ``stage``, phase ``name`` (boost | correct), the
    ``epoch_in_phase``-th epoch of that phase, and the modality index ``modality`` (stage order)
    that the stage boosts."""

    stage: int
    name: str
    epoch_in_phase: int
    modality: int


def phase_of(epoch: int, boost_epochs: int, correct_epochs: int, num_modalities: int) -> Phase:
    """Epoch ``e`` -> stage ``s = e // (E_b + E_c)``, boosting while ``e mod (E_b + E_c) < E_b``,
    else correcting; stage ``s`` boosts modality ``s mod M`` (fixed order)."""
    if boost_epochs < 1 or correct_epochs < 0 or num_modalities < 1 or epoch < 0:
        raise ValueError(f"phase_of needs boost_epochs >= 1, correct_epochs >= 0, num_modalities >= 1, epoch >= 0; "
                         f"got {boost_epochs}, {correct_epochs}, {num_modalities}, {epoch}")
    per = boost_epochs + correct_epochs
    stage, r = divmod(int(epoch), per)
    if r < boost_epochs:
        return Phase(stage, BOOST, r, stage % num_modalities)
    return Phase(stage, CORRECT, r - boost_epochs, stage % num_modalities)


def ensemble_size(stage: int, name: str, num_modalities: int) -> int:
    """How many learners (the first ones in stage order) the ensemble holds: the code adds a
    modality's learner at the end of its first boosting phase, so during stage ``s``'s boosting
    it holds ``min(s, M)`` learners and from its correction phase on ``min(s + 1, M)``."""
    return min(stage + (1 if name == CORRECT else 0), num_modalities)


def boosting_loss(logits_m: Tensor, others: Optional[Tensor], labels: Tensor, w1: float, w2: float,
                  class_mean: bool = True) -> Tensor:
    """Per-sample boosting loss ``l_i = -(w1 - w2 q_i) log softmax(f_m)_i[y_i]``, divided by ``K``
    when ``class_mean`` (the code's ``.mean(-1)`` over one-hot classes).

    ``others`` = ``F_-m`` (the ensemble without learner m; its logits are detached here) gives
    ``q_i = softmax(F_-m)_i[y_i]``. ``None`` = an empty ensemble: the code's constant ``c0``
    expanded to one column, whose softmax is 1, so ``q_i = 1``. Returns ``[B]`` (fp32)."""
    logp = F.log_softmax(logits_m.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    if others is None:
        q = torch.ones_like(logp)
    else:
        q = F.softmax(others.detach().float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    loss = -(w1 - w2 * q) * logp
    if class_mean:
        loss = loss / logits_m.shape[1]
    return loss


def reconcilement_loss(logits_m: Tensor, logits_prev: Tensor, grad: bool = True) -> Tensor:
    """``MSE(softmax(f_m), softmax(f_prev))`` (mean over the ``B x K`` entries); ``f_prev`` is
    always detached; ``grad=False`` also detaches ``f_m`` (the released code: a constant)."""
    p = F.softmax(logits_m.float(), dim=1)
    if not grad:
        p = p.detach()
    return F.mse_loss(p, F.softmax(logits_prev.detach().float(), dim=1))


def stage_lr(base: float, stage: int, every: int, gamma: float) -> float:
    """``base * gamma ** (stage // every)`` (``every`` = 0: constant) -- the code's per-stage
    decay (CREMA-D x0.1 every 30 stages)."""
    if every <= 0:
        return float(base)
    return float(base) * float(gamma) ** (int(stage) // int(every))
