"""Greedy (Wu et al., ICML 2022): MMTM recalibration, conditional learning speed and the curation
rule, as pure functions (spec baselines §4.3; stateful parts in ``methods/greedy.py``)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F


def squeeze(x: Tensor, channel_dim: int = 1) -> Tensor:
    """MMTM's squeeze: the mean of ``x`` over every axis but the batch (0) and the channels,
    ``[B, ..., C, ...] -> [B, C]`` (``[B, C]`` vectors are returned as they are)."""
    if x.dim() < 2:
        raise ValueError(f"squeeze needs a [B, C, ...] tensor, got shape {list(x.shape)}")
    x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)


def excite(x: Tensor, gate: Tensor, channel_dim: int = 1) -> Tensor:
    """``x`` times the channel gate ``gate`` ([B, C], or [C] for one gate for every row),
    broadcast over every other axis."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    if gate.dim() == 2:
        shape[0] = gate.shape[0]
    return x * gate.reshape(shape)


def mmtm_gates(squeezes: Sequence[Tensor], w_squeeze: Tensor, b_squeeze: Optional[Tensor],
               w_excite: Sequence[Tensor], b_excite: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """MMTM's channel gates: ``e = relu(cat(sq_0, sq_1, ...) W_sq^T + b_sq)``,
    ``g_m = sigmoid(e W_m^T + b_m)`` ([B, C_m] each)."""
    e = F.relu(F.linear(torch.cat(list(squeezes), dim=1), w_squeeze, b_squeeze))
    return [torch.sigmoid(F.linear(e, w, b)) for w, b in zip(w_excite, b_excite)]


def running_average(avg: Tensor, value: Tensor, step: Union[int, Tensor]) -> Tensor:
    """The code's cumulative mean: ``(value + avg * step) / (step + 1)`` (``step`` earlier values;
    an int or an integer tensor -- a tensor is never read on the host)."""
    return (value + avg * step) / (step + 1)


def learning_speed(grad_sq: float, weight_sq: float) -> float:
    """One step's learning speed of a parameter set: ``sum ||grad||^2 / sum ||theta||^2``."""
    if weight_sq <= 0:
        raise ValueError("the learning speed needs a parameter set with a non-zero norm")
    return float(grad_sq) / float(weight_sq)


def learning_speed_tensor(grad_sq: Tensor, weight_sq: Tensor) -> Tensor:
    """:func:`learning_speed` on the device (no host read): ``grad_sq / weight_sq``, 0 for a zero
    ``weight_sq`` (a parameter set without a norm has learned nothing yet)."""
    return torch.where(weight_sq > 0, grad_sq / weight_sq, torch.zeros_like(grad_sq))


def balance_ratios(cum_bypass: Sequence[float], cum_main: Sequence[float]) -> List[float]:
    """``BDR_m = log10(cum_bypass_m / cum_main_m)``: the conditional learning speed of modality m
    (how fast its cross-modal bypass learns relative to its own branch)."""
    out = []
    for b, m in zip(cum_bypass, cum_main):
        if b <= 0 or m <= 0:
            out.append(0.0)  # nothing learned yet: no imbalance evidence
        else:
            out.append(math.log10(float(b) / float(m)))
    return out


def balance_ratios_tensor(cum_bypass: Tensor, cum_main: Tensor) -> Tensor:
    """:func:`balance_ratios` on the device (no host read): ``[M]`` tensors in, ``[M]`` out, 0 where
    either cumulative speed is not positive."""
    ok = (cum_bypass > 0) & (cum_main > 0)
    ratio = torch.where(ok, cum_bypass / torch.where(ok, cum_main, torch.ones_like(cum_main)),
                        torch.ones_like(cum_bypass))
    return torch.where(ok, torch.log10(ratio), torch.zeros_like(ratio))


def curation_update(curation: bool, caring: int, step_in_window: int, d: float, epoch: int, *,
                    start_epoch: int, epsilon: float, window: int) -> Tuple[bool, int, int]:
    """One step of the guided-training rule (``Bias_Mitigation_Strong``), after the backward pass,
    for the *next* forward: from ``start_epoch`` on, out of curation mode, ``|d| > epsilon``
    (``d = BDR_0 - BDR_1``) starts a window of ``window`` steps caring for modality 0 if
    ``d > 0`` else 1; in curation mode, the window counts down and ends after ``window`` steps.
    Returns ``(curation, caring, step_in_window)``."""
    if epoch < start_epoch:
        return curation, caring, step_in_window
    if not curation:
        if abs(d) > epsilon:
            return True, (0 if d > 0 else 1), 0
        return False, caring, step_in_window
    step_in_window += 1
    if step_in_window >= window:
        return False, caring, step_in_window
    return True, caring, step_in_window


def conditional_utilisation_rate(acc_all: float, acc_alone: float) -> float:
    """Greedy's ``CUR(m' -> m) = (A(all) - A(m alone)) / A(all)`` (spec baselines §4.26 D3): how
    much of the accuracy needs ``m'`` given ``m``. Undefined (``ValueError``) for ``A(all) = 0``.
    Used by ``mmbalance diagnose`` (late-fusion analogue) and by the ``greedy`` method (MMTM)."""
    if acc_all <= 0:
        raise ValueError("the conditional utilisation rate is undefined when the fused accuracy is 0")
    return (float(acc_all) - float(acc_alone)) / float(acc_all)
