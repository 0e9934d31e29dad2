"""MLB: Multi-Loss Balanced gradient modulation.

Paper: Kontras, Chatzichristodoulou, et al., "Improving Multimodal Learning with Multi-Loss
Gradient Modulation", BMVC 2024 (arXiv 2405.07930). Code read (spec ``baselines.md`` §4.17):
kkontras/MLB@357b5ce -- ``agents/general_agent/helpers/Bias_Infusion.py::Bias_Infusion_MLB``
(``on_backward_end`` / ``_equalize_gradients``, selected by ``method: "OGM-Mine"``),
``models/OGM_Model.py::ConcatClassifier_CREMAD_OGM_pre.forward``, ``configs/{CREMA_D,AVE}/res/MLB.json``.

Computation, per batch:

* loss ``L = CE(fused, y) + unimodal_weight * sum_m CE(h_m, y)`` with ``h_m`` modality m's OWN
  unimodal head (``model.heads[m]``; switched on in :meth:`MLB.configure_model`) and ``fused`` the
  concat head on all features (the code's ``multi_supervised_w`` = {combined 1, c 1, g 1});
* after ``backward``: ``s_m = mean_i softmax(h_m)_i[y_i]`` (detached, fp32),
  ``r_m = mean_{j != m} s_j / s_m`` (M = 2: ``r_a = s_v / s_a``), ``k_m = 1 + tanh(alpha (r_m - 1))``
  -- a weak modality (``r > 1``) gets ``k in (1, 2)`` (boost), a strong one ``k in (0, 1)``
  (damping). ``tanh_mode=2`` caps the boost at ``beta``: ``k = 1 + (beta - 1) tanh(alpha (r - 1))``
  for ``r > 1``;
* for ``start_epoch <= epoch <= end_epoch`` (inclusive, 0-based; code default 0..1500 = always):
  the gradients of encoder m (``params`` rule, default ``all`` = every parameter whose name
  contains the modality, as the code), of modality m's unimodal head, and of the weight columns
  of the concat head that read modality m (``head_blocks``; the shared bias is left alone) are
  multiplied by ``k_m``.

Defaults: alpha 0.8 (CREMA-D and AVE configs alike; presets ``cremad``/``ave`` say so
explicitly), window 0..1500. The authors train MCR-style (Adam, early stopping); the optimiser
is left to the config.

Decisions and deviations:

* DECISION (spec): the released ``Bias_Infusion_MLB.__init__`` calls ``super(Bias_Infusion_OGM_Mine,
  self)`` -- a NameError, the class cannot be constructed as shipped. We implement what the
  class computes once constructed: separate unimodal heads for the scores (the same model class
  uses the W-split for OGM/OGM-GE/MSLR, not for MLB) and scaling of encoder m + its head + fusion
  block m's weight. ``scale_unimodal_head=false`` / ``head_blocks=false`` drop those parts.
* ``head_blocks=true`` needs the concat fusion (a per-modality block of the fused classifier);
  other fusions are refused unless ``method.head_blocks=false``.
* M > 2 (the code has ``Bias_Infusion_MLB_3d``): ``r_m = mean_{j != m} s_j / s_m``; identical to
  the code for M = 2.
* A zero score is floored at 1e-12 in the ratio (the code divides unguarded).
* Processes: the score sums and the row count are summed over processes (one
  ``all_reduce_sum``) before the means, so every replica uses the global-batch coefficients.
* Logs: ``coeff_{m}`` (k_m) and ``ratio_{m}`` (r_m) per batch (averaged per epoch), the loss parts
  ``loss_fused``, ``loss_{m}``. No state beyond the model (``state_attrs`` empty).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.mlb import mlb_coefficients, mlb_ratios
from ..functional.scores import true_class_prob
from .base import LossOutput, Method, register_method
from .gradients import modulated_parameters, scale_modality_grads


@dataclass
class MLBOptions:
    alpha: float = 0.8
    start_epoch: int = 0
    end_epoch: int = 1500
    tanh_mode: int = 1  # 1: k = 1 + tanh(alpha (r - 1)); 2: boost capped at beta
    beta: float = 2.0  # cap of the boost (k <= beta) with tanh_mode=2; beta=2 equals mode 1
    unimodal_weight: float = 1.0  # weight of the summed unimodal-head cross-entropies
    params: str = "all"  # all | auto | conv: which encoder parameters are scaled
    head_blocks: bool = True  # also scale the concat head's weight columns of modality m
    scale_unimodal_head: bool = True  # also scale modality m's own head

    def validate(self):
        errs = []
        if self.alpha < 0:
            errs.append(f"alpha must be >= 0 (k = 1 + tanh(alpha (r - 1))), got {self.alpha}")
        if self.tanh_mode not in (1, 2):
            errs.append(f"tanh_mode must be 1 or 2, got {self.tanh_mode}")
        if self.beta < 1:
            errs.append(f"beta (the cap of the boost) must be >= 1, got {self.beta}")
        if self.unimodal_weight < 0:
            errs.append(f"unimodal_weight must be >= 0, got {self.unimodal_weight}")
        if self.params not in ("auto", "conv", "all"):
            errs.append(f"params must be auto, conv or all, got '{self.params}'")
        if self.end_epoch < self.start_epoch:
            errs.append(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        return errs


@register_method("mlb", paper="Kontras et al., BMVC 2024", kind="optimisation",
                 description="MLB: fused + unimodal-head losses; boost the weak and damp the strong encoder's "
                             "gradients by 1 + tanh(alpha (r - 1))")
class MLB(Method):
    Options = MLBOptions
    modality_range = (2, None)
    presets = {"cremad": {"method": {"alpha": 0.8}}, "ave": {"method": {"alpha": 0.8}}}

    def configure_model(self, model_cfg):
        if self.options.head_blocks and getattr(model_cfg, "fusion", "concat") != "concat":
            raise MethodSetupError(f"method 'mlb' scales the concat head's per-modality weight blocks and needs "
                                   f"model.fusion=concat (got '{model_cfg.fusion}'); set method.head_blocks=false "
                                   f"to use another fusion")
        model_cfg.unimodal_heads = True

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        if not out.unimodal_logits:
            raise MethodSetupError("method 'mlb' needs unimodal heads (model.add_heads())")
        fused = F.cross_entropy(out.logits, batch.labels)
        uni = {m: F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in self.modalities}
        loss = fused + self.options.unimodal_weight * sum(uni.values())
        logs = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in uni.items()}}
        return LossOutput(loss, out, logs)

    def coefficients(self, head_logits, labels):
        """``(k [M], r [M])`` from the global batch's mean true-class probabilities (fp32)."""
        with torch.no_grad():
            sums = torch.stack([true_class_prob(head_logits[m].detach().float(), labels).sum()
                                for m in self.modalities])
            n = torch.tensor([float(labels.shape[0])], device=sums.device)
            tot = D.all_reduce_sum(torch.cat([sums, n]))
            scores = tot[:-1] / tot[-1].clamp_min(1.0)
            o = self.options
            return mlb_coefficients(scores, o.alpha, o.tanh_mode, o.beta), mlb_ratios(scores)

    def after_backward(self, model, batch, result, ctx):
        o = self.options
        if not (o.start_epoch <= ctx.epoch <= o.end_epoch):
            return
        k, r = self.coefficients(result.output.unimodal_logits, batch.labels)
        coeffs = {m: k[i] for i, m in enumerate(self.modalities)}
        with torch.no_grad():
            scale_modality_grads(model, {m: c for m, c in coeffs.items()}, o.params, include_head_blocks=o.head_blocks)
            if o.scale_unimodal_head and model.heads is not None:
                for m, c in coeffs.items():
                    for p in modulated_parameters(model.heads[m], "all"):
                        if p.grad is not None:
                            p.grad.mul_(c.to(p.grad.dtype))
        result.logs.update({f"coeff_{m}": k[i] for i, m in enumerate(self.modalities)})
        result.logs.update({f"ratio_{m}": r[i] for i, m in enumerate(self.modalities)})
