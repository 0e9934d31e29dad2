"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement.

Paper: Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022. Code followed: GeWu-Lab/OGM-GE_CVPR2022 (``main.py``), spec §4.

Per batch, after ``loss.backward()`` on the fused cross-entropy:
``score_m = sum_i softmax(l^m_i)[y_i]`` with the fusion's per-modality logits (W-split with b/M
for concat fusion), ``rho_m = score_m / score_other``; the modality with ``rho > 1`` gets
``k = 1 - tanh(alpha * rho)``, the other 1. For epochs ``start_epoch <= epoch <= end_epoch``
(inclusive, as the code) the gradients of that encoder's modulated parameters are multiplied by
k; OGM-GE (``ogm_ge``) then adds ``N(0, std(grad) + 1e-8)`` noise to the modulated parameters of
*every* encoder (the code does this for both branches, with k = 1 for the weaker one).

Deviations, each a switch:
* Which parameters are modulated: the code modulates 4-D (convolution) weights only.
  ``params="auto"`` (default) does exactly that when the encoder has 4-D parameters and
  otherwise modulates every weight with >= 2 dimensions (MLP / transformer encoders have no
  convolutions, and the code's rule would leave them unmodulated). ``params="conv"`` is the
  code's rule everywhere; ``params="all"`` modulates every encoder parameter.
* M > 2 (not in the paper): ``rho_m = score_m / mean_{j != m} score_j``; identical for M = 2.
* The code's default modulation window is epochs 0..50; ours too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from ..functional.ogm import modulate_gradient, ogm_coefficients
from .base import Method, register_method


@dataclass
class OGMOptions:
    alpha: float = 0.1
    start_epoch: int = 0
    end_epoch: int = 50
    params: str = "auto"  # auto | conv | all

    def validate(self):
        if self.params not in ("auto", "conv", "all"):
            return [f"params must be auto, conv or all, got '{self.params}'"]
        return []


def modulated_parameters(encoder: torch.nn.Module, rule: str) -> List[torch.nn.Parameter]:
    params = [p for p in encoder.parameters() if p.requires_grad]
    conv = [p for p in params if p.dim() == 4]
    if rule == "all":
        return params
    if rule == "conv" or conv:
        return conv
    return [p for p in params if p.dim() >= 2]


class _OGMBase(Method):
    Options = OGMOptions
    noise = False

    def after_backward(self, model, batch, result, ctx):
        o = self.options
        if not (o.start_epoch <= ctx.epoch <= o.end_epoch):
            return
        feats = {m: z.detach().float() for m, z in result.output.features.items()}
        with torch.no_grad():
            coeffs = ogm_coefficients(model.modality_logits(feats), batch.labels, o.alpha)
        for m, k in coeffs.items():
            for p in modulated_parameters(model.encoders[m], o.params):
                if p.grad is not None:
                    p.grad = modulate_gradient(p.grad, k, self.noise)
        result.logs.update({f"coeff_{m}": k for m, k in coeffs.items()})


@register_method("ogm_ge", paper="Peng et al., CVPR 2022", kind="optimisation",
                 description="OGM-GE: scale the dominant encoder's gradients by 1 - tanh(alpha*rho), plus Gaussian noise")
class OGMGE(_OGMBase):
    noise = True


@register_method("ogm", paper="Peng et al., CVPR 2022", kind="optimisation",
                 description="OGM without the Gaussian-noise GE term")
class OGM(_OGMBase):
    noise = False
