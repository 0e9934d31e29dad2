"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement.

Paper: Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022. Code followed: GeWu-Lab/OGM-GE_CVPR2022 (``main.py``, README), spec
``seed-methods.md`` §4 and ``baselines.md`` §4.1.

Per batch, after ``loss.backward()`` on the fused cross-entropy:
``score_m = sum_i softmax(l^m_i)[y_i]`` with the fusion's per-modality logits (W-split with b/M
for concat fusion), ``rho_m = score_m / score_other``; the modality with ``rho > 1`` gets
``k = 1 - tanh(alpha * rho)``, the other 1. For epochs ``start_epoch <= epoch <= end_epoch``
(inclusive, as the code) the gradients of that encoder's modulated parameters are multiplied by
k; OGM-GE (``ogm_ge``) then adds ``N(0, std(grad) + 1e-8)`` noise to the modulated parameters of
*every* encoder (the code does this for both branches, with k = 1 for the weaker one; the std is
that of the unscaled gradient, as the code's ``grad = grad * k + normal_(0, grad.std() + 1e-8)``).

Presets of ``alpha`` per dataset (``presets``; ``method.alpha=...`` overrides; both ``ogm`` and
``ogm_ge``, the coefficient being the same):

=================  =====  =====================================================================
dataset            alpha  source
=================  =====  =====================================================================
cremad             0.8    authors' README ("we recommend alpha=0.8 for CREMA-D")
vggsound           0.1    authors' README and the code's default setting
kinetics_sounds    0.8    the same authors' TPAMI code, ``code/scripts/train_ogm.sh`` (KS)
ave                0.6    MCR ``run.sh`` (ResNet-18, OGM on AVE)
ucf101             0.8    MCR ``run.sh`` (ResNet-18, OGM on UCF)
(others)           0.1    the code's default
=================  =====  =====================================================================

Deviations and decisions, each a switch or named here:
* Which parameters are modulated: the code modulates 4-D (convolution) weights only.
  ``params="auto"`` (default) does exactly that when the encoder has 4-D parameters and
  otherwise modulates every weight with >= 2 dimensions (MLP / transformer encoders have no
  convolutions, and the code's rule would leave them unmodulated). ``params="conv"`` is the
  code's rule everywhere; ``params="all"`` modulates every encoder parameter.
* M > 2 (not in the paper): ``rho_m = score_m / mean_{j != m} score_j``; identical for M = 2.
* The code's default modulation window is epochs 0..50; ours too.
* Processes: the scores are a batch statistic that changes the gradients, so under torchrun the
  per-modality score sums are summed over processes (one ``all_reduce_sum`` of the ``[M]`` vector)
  before rho and k: every replica uses the coefficients of the global batch (the code, on one
  process with DataParallel, also scores the whole batch). The gradients being modulated are the
  DDP-averaged ones.
* GE noise: drawn on each parameter's device, in the gradient's dtype, from one generator per
  training step seeded with ``ge_seed(ctx.seed, ctx.global_step)`` (``functional/ogm.py``),
  consumed in a fixed order (modalities in dataset order, then the encoder's parameter order).
  It is therefore identical on every process (replicas stay identical) and reproducible for a
  given (seed, step). The code draws from the global RNG (``zeros_like(grad).normal_``), so its
  noise depends on everything else that consumed that RNG; the distribution is the same.
* No host synchronisation in the hook: the std of each gradient and the coefficients stay device
  tensors (the code's ``grad.std().item()`` reads every std back to the host); the logged
  ``coeff_<m>`` values are 0-d tensors, read by the trainer with the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from .. import distributed as D
from ..functional.ogm import ogm_coefficient_tensor
from ..functional.scores import modality_scores
from .base import Method, register_method
from .gradients import modulate_encoders


@dataclass
class OGMOptions:
    tune_space = {"alpha": ("log", 0.05, 2.0)}  # mmbalance tune ranges (presets span 0.1..0.8)
    alpha: float = 0.1
    start_epoch: int = 0
    end_epoch: int = 50
    params: str = "auto"  # auto | conv | all

    def validate(self):
        errs = []
        if self.params not in ("auto", "conv", "all"):
            errs.append(f"params must be auto, conv or all, got '{self.params}'")
        if self.alpha < 0:
            errs.append(f"alpha must be >= 0 (the coefficient is 1 - tanh(alpha * rho)), got {self.alpha}")
        if self.end_epoch < self.start_epoch:
            errs.append(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        return errs


#: alpha per dataset (see the module docstring for the sources)
OGM_PRESETS = {
    "cremad": {"method": {"alpha": 0.8}},
    "vggsound": {"method": {"alpha": 0.1}},
    "kinetics_sounds": {"method": {"alpha": 0.8}},
    "ave": {"method": {"alpha": 0.6}},
    "ucf101": {"method": {"alpha": 0.8}},
}


class _OGMBase(Method):
    Options = OGMOptions
    presets = OGM_PRESETS
    noise = False

    def coefficients(self, model, features, labels) -> Dict[str, torch.Tensor]:
        """``k_m`` (0-d device tensors) from the global-batch scores (summed over processes)."""
        feats = {m: z.detach().float() for m, z in features.items()}
        with torch.no_grad():
            scores = modality_scores(model.modality_logits(feats), labels)
            vec = D.all_reduce_sum(torch.stack([scores[m] for m in self.modalities]))
            k = ogm_coefficient_tensor(vec, self.options.alpha)
        return {m: k[i] for i, m in enumerate(self.modalities)}

    def after_backward(self, model, batch, result, ctx):
        o = self.options
        if not (o.start_epoch <= ctx.epoch <= o.end_epoch):
            return
        coeffs = self.coefficients(model, result.output.features, batch.labels)
        modulate_encoders(model, coeffs, o.params, self.noise, ctx.seed, ctx.global_step)
        result.logs.update({f"coeff_{m}": k for m, k in coeffs.items()})


@register_method("ogm_ge", paper="Peng et al., CVPR 2022", kind="optimisation",
                 description="OGM-GE: scale the dominant encoder's gradients by 1 - tanh(alpha*rho), plus Gaussian noise")
class OGMGE(_OGMBase):
    noise = True


@register_method("ogm", paper="Peng et al., CVPR 2022", kind="optimisation",
                 description="OGM without the Gaussian-noise GE term")
class OGM(_OGMBase):
    noise = False
