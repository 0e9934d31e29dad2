"""Gradient edits several methods share (stateful: they change ``p.grad`` of a model).

* :func:`modulated_parameters` -- which encoder parameters a method modulates (spec baselines
  §3.3: ``conv`` = 4-D conv weights only, as OGM-GE/AMSS code; ``all``; ``auto`` = conv weights
  where the encoder has any, else every weight matrix);
* :func:`scale_modality_grads` -- multiply those gradients by a per-modality coefficient, and
  optionally the modality's block of the fusion head (MLB and the peer's re-implementations);
* :func:`modulate_encoders` -- OGM(-GE)'s edit: coefficient and, for GE, Gaussian noise drawn
  from one per-step generator per device (OGM-GE, OPM+OGM).
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import Tensor

from ..errors import MethodSetupError


def modulated_parameters(encoder: torch.nn.Module, rule: str) -> List[torch.nn.Parameter]:
    params = [p for p in encoder.parameters() if p.requires_grad]
    conv = [p for p in params if p.dim() == 4]
    if rule == "all":
        return params
    if rule == "conv" or conv:
        return conv
    return [p for p in params if p.dim() >= 2]


def head_block(model, modality: str) -> slice:
    """The columns of a concat fusion's ``fc.weight`` that multiply ``modality``'s features."""
    fusion = model.fusion
    dims = getattr(fusion, "dims", None)
    if type(fusion).__name__ != "ConcatFusion" or dims is None:
        raise MethodSetupError(f"per-modality head blocks need the concat fusion; this model has "
                               f"{type(fusion).__name__}")
    start = 0
    for m, d in dims.items():
        if m == modality:
            return slice(start, start + d)
        start += d
    raise KeyError(modality)


def scale_modality_grads(model, coeffs: Mapping[str, float | Tensor], rule: str = "all",
                         include_head_blocks: bool = False) -> None:
    """``p.grad *= coeffs[m]`` for ``p in modulated_parameters(model.encoders[m], rule)``; with
    ``include_head_blocks`` also the columns of the concat head that read modality m (the bias,
    shared by all modalities, is left alone). Parameters without a gradient are skipped."""
    for m, k in coeffs.items():
        for p in modulated_parameters(model.encoders[m], rule):
            if p.grad is not None:
                p.grad.mul_(k)
        if include_head_blocks:
            g = model.fusion.fc.weight.grad
            if g is not None:
                g[:, head_block(model, m)] *= k


def modulate_encoders(model, coeffs: Mapping[str, Tensor], rule: str, noise: bool, seed: int, step: int) -> None:
    """``p.grad = grad * k_m (+ N(0, std(grad)) for GE)`` for ``p in modulated_parameters(encoders[m],
    rule)``. The noise of a step comes from generators seeded by ``(seed, step)`` -- one per device,
    drawn in modality then parameter order -- so every process adds the same noise."""
    from ..functional.ogm import ge_generator, modulate_gradient
    generators: Dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for m, k in coeffs.items():
            for p in modulated_parameters(model.encoders[m], rule):
                if p.grad is None:
                    continue
                gen = None
                if noise:
                    gen = generators.get(p.grad.device)
                    if gen is None:
                        gen = generators[p.grad.device] = ge_generator(seed, step, p.grad.device)
                p.grad = modulate_gradient(p.grad, k.to(device=p.grad.device, dtype=p.grad.dtype), noise, gen)
