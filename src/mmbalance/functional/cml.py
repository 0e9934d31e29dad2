"""CML (Ma, Zhang et al., ICML 2023) -- the stateless math: nested modality-removal masks and the
confidence ranking loss."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def random_removal_positions(batch: int, num_modalities: int, generator: torch.Generator) -> Tensor:
    """``pos [B, M]``: ``pos[i, m]`` = the step at which modality m is removed for sample i in a
    uniformly random order (0 = first removed); each row is a permutation of ``0..M-1``. Drawn on
    the CPU from ``generator``."""
    order = torch.rand(batch, num_modalities, generator=generator).argsort(dim=1)  # removal order pi_i
    return order.argsort(dim=1)


def nested_keep_masks(positions: Tensor) -> list[Tensor]:
    """``[keep_0, ..., keep_{M-1}]`` (bool [B, M]): ``keep_k = positions >= k`` -- all modalities at
    k = 0, then one more removed per step, one left at k = M-1."""
    m = positions.shape[1]
    return [positions >= k for k in range(m)]


def ranking_loss(logits: Sequence[Tensor], labels: Tensor, epsilon: float = 0.0,
                 trick1: bool = True, trick2: bool = True) -> Tensor:
    """CML's ranking loss over a nested chain ``logits[0]`` (all modalities) ... ``logits[M-1]``
    (one left), **summed** over the batch and the chain:

    ``sum_k sum_i ReLU((conf_{k+1} - conf_k) [pred_k = y] - eps)``                      (trick 1)
    ``      + ReLU((conf_{k+1} - sg(conf_k)) [pred_{k+1} != y and pred_k != y] - eps)``   (trick 2)

    ``conf = max softmax``, ``pred = argmax``; ``sg`` = stop-gradient (the code detaches the
    fuller input's confidence in trick 2 only)."""
    probs = [l.softmax(dim=1) for l in logits]
    conf = [p.max(dim=1).values for p in probs]
    pred = [p.argmax(dim=1) for p in probs]
    total = logits[0].new_zeros(())
    for k in range(len(logits) - 1):
        if trick1:
            right = (pred[k] == labels).to(conf[k].dtype)
            total = total + torch.relu((conf[k + 1] - conf[k]) * right - epsilon).sum()
        if trick2:
            wrong = ((pred[k + 1] != labels) & (pred[k] != labels)).to(conf[k].dtype)
            total = total + torch.relu((conf[k + 1] - conf[k].detach()) * wrong - epsilon).sum()
    return total


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A generator seed for one (run seed, global step, process rank)."""
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(rank) * 104_729 + 0x5EED) % (2 ** 63 - 1)
