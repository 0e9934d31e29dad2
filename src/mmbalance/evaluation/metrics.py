"""Classification metrics in torch, equal to scikit-learn's."""
from __future__ import annotations

import torch
from torch import Tensor


def accuracy(pred: Tensor, target: Tensor) -> float:
    if target.numel() == 0:
        return float("nan")
    return float((pred == target).float().mean())


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def macro_f1(pred: Tensor, target: Tensor, num_classes: int | None = None) -> float:
    """Macro F1 over the classes present in ``target`` or ``pred`` (sklearn's ``f1_score(...,
    average="macro")`` with its default ``labels=None`` and ``zero_division`` -> 0)."""
    if target.numel() == 0:
        return float("nan")
    k = int(num_classes if num_classes is not None else int(torch.max(torch.cat([pred, target]))) + 1)
    cm = confusion_matrix(pred, target, k).double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    present = denom > 0
    return float(f1[present].mean())
