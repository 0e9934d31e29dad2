"""Per-modality confidence scores shared by OGM-GE, B-MM and the GMM gap."""
from __future__ import annotations

from typing import Dict, Mapping

from torch import Tensor


def true_class_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """softmax(logits)[i, y_i] for every row: [B]."""
    return logits.softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1)


def modality_scores(modality_logits: Mapping[str, Tensor], labels: Tensor) -> Dict[str, Tensor]:
    """OGM-GE's score_m = sum_i softmax(l^m_i)[y_i] (summed over the batch), per modality."""
    return {m: true_class_prob(l, labels).sum() for m, l in modality_logits.items()}
