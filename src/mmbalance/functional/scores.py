"""Per-modality confidence scores shared by OGM-GE, B-MM, the GMM gap and the other
gradient-editing methods (ARM, MIDAS, MLB, InfoReg, OPM, ...).

Always computed in float32: the logits are upcast and autocast is switched off inside, so under
``train.precision=bf16|fp16`` the coefficients a method derives from these scores are the fp32
computation on the same logits (gradients still flow through the upcast). In fp32 the upcast is
a no-op, so fp32 results are unchanged.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import Tensor


def true_class_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """softmax(logits)[i, y_i] for every row, in float32: [B]."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = logits.float().softmax(dim=1)
        return p.gather(1, labels.view(-1, 1)).squeeze(1)


def modality_scores(modality_logits: Mapping[str, Tensor], labels: Tensor) -> Dict[str, Tensor]:
    """OGM-GE's score_m = sum_i softmax(l^m_i)[y_i] (summed over the batch), per modality, in float32."""
    return {m: true_class_prob(l, labels).sum() for m, l in modality_logits.items()}
