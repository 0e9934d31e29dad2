"""Gradients of several losses, kept apart (spec baselines §2 gap I: MMPareto, InfoReg, CGGM).

:func:`per_loss_grads` differentiates each loss separately with ``torch.autograd.grad`` (the
graph is retained between losses) and never touches ``.grad``, so a method can combine the
per-loss gradients as it likes and write the result itself.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor


def per_loss_grads(losses: Mapping[str, Tensor], params: Mapping[str, Sequence[torch.nn.Parameter]],
                   retain_graph: bool = True) -> Dict[str, Dict[str, List[Optional[Tensor]]]]:
    """``out[loss][group][i]`` = d loss / d ``params[group][i]`` (``None`` where the loss does not
    depend on that parameter). ``retain_graph`` keeps the graph for a later ``backward``."""
    groups = list(params)
    flat = [p for g in groups for p in params[g]]
    out: Dict[str, Dict[str, List[Optional[Tensor]]]] = {}
    names = list(losses)
    for i, name in enumerate(names):
        keep = retain_graph or i < len(names) - 1
        grads = torch.autograd.grad(losses[name], flat, retain_graph=keep, allow_unused=True)
        out[name], k = {}, 0
        for g in groups:
            n = len(params[g])
            out[name][g] = list(grads[k:k + n])
            k += n
    return out


def flatten(grads: Sequence[Optional[Tensor]], like: Sequence[torch.nn.Parameter]) -> Tensor:
    """One vector of ``grads`` (zeros where a gradient is ``None``), in the order of ``like``."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, like)])


def unflatten(vector: Tensor, like: Sequence[torch.nn.Parameter]) -> List[Tensor]:
    """The inverse of :func:`flatten`: tensors shaped like ``like``."""
    out, k = [], 0
    for p in like:
        out.append(vector[k:k + p.numel()].view_as(p))
        k += p.numel()
    return out
