"""OPM's drop probabilities and feature dropping (Wei, Hu, Du, Wen, TPAMI 2024), as pure functions.

Spec ``baselines.md`` §4.7; code GeWu-Lab/BML_TPAMI2024@4b3aa4f ``code/models/Classifier.py``
(``calcu_q``, ``Modality_drop.execute_drop``, ``custom_autograd``).

* :func:`opm_discrepancy` -- ``r_m = tanh(relu(s_m / mean_{j != m} s_j - 1))`` (``calcu_q``'s
  ratio; pairwise for M = 2, the mean of the others for M > 2);
* :func:`opm_drop_probabilities` -- ``q_m = clip(q_base (1 + lam r_m), 0, 1)`` where ``r_m > 0``,
  else 0 (only a modality stronger than the others' mean is ever dropped);
* :func:`opm_theta` -- ``theta = sum_m d_m q_m / sum_m d_m``, the expected dropped fraction of
  the concatenated feature vector;
* :func:`opm_masks` -- ``mask[m, i] ~ Bernoulli(1 - q_m)`` from a generator;
* :func:`opm_apply_drop` -- masked and rescaled features (``global``: one factor ``1/(1 - theta)``,
  the code; ``per_modality``: ``1/(1 - q_m)``) and the rows with at least one modality kept.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import torch
from torch import Tensor


def opm_seed(seed: int, step: int, stream: int = 0) -> int:
    """Seed of OPM's draws in training step ``step`` (``stream`` separates independent draws,
    e.g. per process): ``(seed * 1_000_033 + step * 7927 + stream * 104_729 + 211) mod 2**62``."""
    return (int(seed) * 1_000_033 + int(step) * 7927 + int(stream) * 104_729 + 211) % (2 ** 62)


def opm_discrepancy(scores: Tensor) -> Tensor:
    """``r_m = tanh(relu(s_m / mean_{j != m} s_j - 1))`` for a ``[M]`` score vector (float32).
    Where the others' mean is 0 the ratio is taken as infinite (``r = 1``)."""
    s = scores.detach().float()
    n = s.numel()
    if n < 2:
        raise ValueError(f"OPM needs at least two modality scores, got {n}")
    others = (s.sum() - s) / (n - 1)
    ratio = torch.where(others > 0, s / others.clamp_min(torch.finfo(s.dtype).tiny), torch.full_like(s, float("inf")))
    return torch.tanh(torch.relu(ratio - 1.0))


def opm_drop_probabilities(scores: Tensor, q_base: float, lam: float) -> Tensor:
    """``q_m = clip(q_base * (1 + lam * r_m), 0, 1)`` where ``r_m > 0``, else 0; ``[M]`` float32."""
    r = opm_discrepancy(scores)
    q = torch.where(r > 0, q_base * (1.0 + lam * r), torch.zeros_like(r))
    return q.clamp(0.0, 1.0)


def opm_theta(dims: Sequence[int], q: Tensor) -> Tensor:
    """``theta = sum_m d_m q_m / sum_m d_m`` (0-d, float32)."""
    d = torch.as_tensor(list(dims), dtype=torch.float32, device=q.device)
    return (d * q.float()).sum() / d.sum()


def opm_masks(q: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """``[M, B]`` float masks, ``mask[m, i] ~ Bernoulli(1 - q_m)`` (1 = keep), drawn on the
    generator's device."""
    keep_p = (1.0 - q.detach().float()).to(generator.device)
    u = torch.rand((q.numel(), batch_size), generator=generator, device=generator.device)
    return (u < keep_p[:, None]).float()


def opm_apply_drop(features: Mapping[str, Tensor], masks: Tensor, q: Tensor,
                   rescale: str = "global") -> Tuple[Dict[str, Tensor], Tensor]:
    """Drop whole feature vectors and rescale.

    ``features``: ``{m: [B, d_m]}`` in modality order matching the rows of ``masks`` ``[M, B]``
    and of ``q`` ``[M]``. ``rescale="global"`` (the code): ``z~_m = z_m mask_m / (1 - theta)``
    with ``theta`` from :func:`opm_theta` (0 when ``theta = 1``); ``"per_modality"``:
    ``z~_m = z_m mask_m / (1 - q_m)`` (no rescale where ``q_m = 1``). Returns the new features
    (all rows) and ``keep [B]`` (bool): rows where at least one modality is kept.
    """
    names = list(features)
    if masks.shape[0] != len(names) or q.numel() != len(names):
        raise ValueError(f"masks {tuple(masks.shape)} / q {tuple(q.shape)} do not match {len(names)} modalities")
    if rescale not in ("global", "per_modality"):
        raise ValueError(f"rescale must be 'global' or 'per_modality', got '{rescale}'")
    q = q.detach().float()
    if rescale == "global":
        theta = opm_theta([features[m].shape[1] for m in names], q)
        g = torch.where(theta < 1, 1.0 / (1.0 - theta).clamp_min(1e-12), torch.zeros_like(theta))
        scales = [g] * len(names)
    else:
        scales = [torch.where(q[i] < 1, 1.0 / (1.0 - q[i]).clamp_min(1e-12), torch.ones_like(q[i]))
                  for i in range(len(names))]
    out = {}
    for i, m in enumerate(names):
        z = features[m]
        factor = masks[i].to(device=z.device, dtype=z.dtype)[:, None] * scales[i].to(device=z.device, dtype=z.dtype)
        out[m] = z * factor
    keep = masks.sum(0) > 0
    return out, keep


def drop_rows(features: Mapping[str, Tensor], keep: Tensor) -> Dict[str, Tensor]:
    """``{m: z[keep]}``."""
    idx = keep.nonzero().squeeze(1)
    return {m: z.index_select(0, idx.to(z.device)) for m, z in features.items()}

