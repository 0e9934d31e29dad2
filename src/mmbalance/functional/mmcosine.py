"""MMCosine (Xu et al., ICASSP 2023) -- the stateless math: scaled cosine logits of one modality."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_logits(features: Tensor, weight: Tensor, scale: float, eps: float = 1e-12) -> Tensor:
    """``scale * normalize(z, dim=1) @ normalize(W, dim=1)^T`` ([B, K]): the cosine between each
    row of ``features`` [B, d] and each class row of ``weight`` [K, d], times ``scale``; no bias.
    A zero feature row (a removed modality) gives zero logits."""
    return scale * F.normalize(features, dim=1, eps=eps) @ F.normalize(weight, dim=1, eps=eps).t()
