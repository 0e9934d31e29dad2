"""AGM: Adaptive Gradient Modulation (Shapley-based).

Paper: Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023 (arXiv 2308.07686). Code followed: lihong2303/AGM@5a65542
(``model/CREMAD_net.py::GradMod``, ``run/CREMAD_main.py::train``, ``model/URFunny_net.py``,
``model/MOSEI_net.py``), as specified in ``shared/specs/baselines.md`` §4.4. Math in
``functional/agm.py``.

Per batch (``compute_loss``; every pass below runs with autograd on, inside ``ctx.run``):

1. ``total = f(x)``: the whole network in its training mode.
2. For every proper non-empty subset S of modalities, ``f_S``: the network with the other
   modalities removed, *in eval mode* (the code's ``net.eval()``: BatchNorm running statistics,
   dropout off; the modes are restored afterwards). ``level="input"`` (default, the code) zeroes
   the removed modalities' inputs and runs the encoders again (2^M - 1 forwards);
   ``level="feature"`` zeroes the removed modalities' pooled features of pass 1 and re-runs only
   the fusion (1 encoder pass per modality, 2^M - 1 fusion passes: about the cost of joint
   training).
3. Shapley logits ``phi_m = sum_{S ⊆ M\\{m}} |S|!(M-|S|-1)!/M! (f_{S∪{m}} - f_S)`` with
   ``f_∅ := 0`` and ``f_M := total`` (the code drops the empty-set term, so ``sum_m phi_m ==
   total``; the ∅ pass the code runs is therefore not run here -- its value is unused).
4. Scores (no grad, fp32): ``s_m = batch-mean -log max(softmax(phi_m)[y], 1e-8)``;
   ``r_m = exp(M/(M-1) (mean_j s_j - s_m))``; ``rbar_m`` the same from the running mean
   ``sbar`` of s over all steps so far; ``c_m = exp(alpha min(rbar_m - r_m, cap))``; then
   ``sbar <- sbar (it-1)/it + s/it`` (``it`` = 1-based step count, state ``step``).
5. ``out = sum_m H_m(phi_m)`` with ``H_m`` the identity whose backward multiplies the gradient by
   ``c_m`` inside ``start_epoch <= epoch <= end_epoch`` (inclusive) and by 1 outside;
   ``loss = CE(out, y)`` (numerically ``out == total``).
6. ``after_backward``: if any entry of the fusion head's weight gradients exceeds
   ``clip_threshold`` in absolute value, clip the global gradient norm of all parameters to
   ``clip_norm`` (the code: 1/1 for CREMA-D, 5/5 for URFunny). This method owns clipping
   (``grad_clip_owner = "method"``): ``train.grad_clip`` is not applied on top.

Logged per batch (epoch means): ``coeff_{m}`` (c_m as applied: 1 outside the window),
``ratio_{m}`` (r_m), ``score_{m}`` (s_m).

Options (defaults = the code's argparse): ``alpha=1.0``, ``start_epoch=0``, ``end_epoch=20``,
``cap=10.0`` (``none`` = no cap, as MOSEI), ``level="input"|"feature"``, ``clip_threshold=1.0``,
``clip_norm=1.0`` (0 = never clip).

Presets: ``cremad`` alpha 1.0 (code default), cap 10, clip 1/1; ``ave`` alpha 3.0 (MCR's
``run.sh``, the only AVE value known); ``mosei`` cap none (``MOSEI_net.py``). Other known values,
not used as presets: README AV-MNIST alpha 2.5; MLB's CREMA-D config 1.5; MCR's CREMA-D 3.0.

Decisions and deviations:
* DECISION (spec): the authors' masked passes (eval mode, zero *input*, with grad) and backward
  hooks, not the peer's no-grad passes with name-based gradient scaling; ``level="feature"`` is
  offered as the cheaper option (it is *not* the code: the masked passes reuse train-mode
  features).
* The empty-subset pass is skipped (its value is dropped by the code anyway); numerically
  identical.
* Distributed (torchrun): ``s_m`` is a batch statistic that changes the gradients, so the
  per-row cross-entropy sums and the row count are summed over processes (one
  ``all_reduce_sum`` of an ``[M + 1]`` vector) and every replica uses the global-batch scores;
  the running mean and the coefficients are therefore identical on every process. The clipping
  test reads the DDP-averaged gradients, so it is identical too.
* The clipping trigger reads the gradients of the fusion's weight matrices (parameters of
  ``model.fusion`` with >= 2 dimensions; the concat head's ``fc.weight``), the code's
  ``fc_out.weight``. The conditional clip is done without a host synchronisation (the clip
  factor is ``min(1, clip_norm / (norm + 1e-6))`` where triggered, else 1, as
  ``clip_grad_norm_``).
* ``sbar`` and ``step`` are method state (checkpointed); ``sbar`` starts at 0, so ``rbar = 1`` on
  the first step, as the code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..functional.agm import agm_coefficients, agm_ratios, running_mean, scale_grad, shapley_logits, shapley_scores
from ..functional.common import all_subsets
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method


@dataclass
class AGMOptions:
    tune_space = {"alpha": ("log", 0.25, 4.0)}  # mmbalance tune ranges (presets 1..3)
    alpha: float = 1.0
    start_epoch: int = 0
    end_epoch: int = 20
    cap: Optional[float] = 10.0  # None = no cap (MOSEI)
    level: str = "input"  # input (the code) | feature (cheaper)
    clip_threshold: float = 1.0  # clip when max |grad of the fusion weights| exceeds this
    clip_norm: float = 1.0  # ... to this global norm; 0 = never clip

    def validate(self):
        errs = []
        if self.alpha < 0:
            errs.append(f"alpha must be >= 0, got {self.alpha}")
        if self.level not in ("input", "feature"):
            errs.append(f"level must be input or feature, got '{self.level}'")
        if self.end_epoch < self.start_epoch:
            errs.append(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        if self.cap is not None and self.cap < 0:
            errs.append(f"cap must be >= 0 or none, got {self.cap}")
        if self.clip_threshold < 0:
            errs.append(f"clip_threshold must be >= 0, got {self.clip_threshold}")
        if self.clip_norm < 0:
            errs.append(f"clip_norm must be >= 0 (0 = never clip), got {self.clip_norm}")
        return errs


AGM_PRESETS = {
    "cremad": {"method": {"alpha": 1.0, "cap": 10.0, "clip_threshold": 1.0, "clip_norm": 1.0}},
    "ave": {"method": {"alpha": 3.0}},
    "mosei": {"method": {"cap": None}},
}


@contextlib.contextmanager
def _eval_mode(model):
    """Every submodule in eval mode (the code's ``net.eval()``); each module's own flag restored."""
    modes = [(mod, mod.training) for mod in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for mod, was in modes:
            mod.training = was


@register_method("agm", paper="Li et al., ICCV 2023", kind="optimisation", modalities=">=2",
                 description="AGM: Shapley-decomposed logits, each modality's gradient scaled by exp(alpha*(rbar-r))")
class AGM(Method):
    Options = AGMOptions
    presets = AGM_PRESETS
    modality_range = (2, None)
    grad_clip_owner = "method"
    state_attrs = ("score_mean", "step")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.score_mean: torch.Tensor = torch.zeros(len(self.modalities))
        self.step: int = 0

    # ------------------------------------------------------------------------ forward + loss
    def subset_values(self, model, inputs, features) -> Dict[frozenset, torch.Tensor]:
        """Fused logits of every proper non-empty subset, in eval mode, with grad."""
        mods = list(self.modalities)
        subsets = [s for s in all_subsets(mods) if s and len(s) < len(mods)]
        with _eval_mode(model):
            if self.options.level == "input":
                return model.subset_logits(inputs, subsets, level="input", bn="eval")
            return model.subset_logits(inputs, subsets, level="feature", features=features)

    def coefficients(self, phi, labels, epoch):
        """``(c, r, s)`` as [M] fp32 tensors from the global-batch scores; updates the running mean."""
        o = self.options
        with torch.no_grad():
            rows = shapley_scores(phi, labels, reduce=False)
            ce = torch.stack([rows[m] for m in self.modalities])  # [M, B]
            vec = D.all_reduce_sum(torch.cat([ce.sum(1), ce.new_tensor([ce.shape[1]])]))
            s = vec[:-1] / vec[-1]
            mean = self.score_mean.to(device=s.device, dtype=s.dtype)
            r = agm_ratios(s)
            r_bar = agm_ratios(mean)
            c = agm_coefficients(r, r_bar, o.alpha, o.cap)
            self.step += 1
            self.score_mean = running_mean(mean, s, self.step)
            if not (o.start_epoch <= epoch <= o.end_epoch):
                c = torch.ones_like(c)
        return c, r, s

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        values = self.subset_values(model, batch.inputs, out.features)
        values[frozenset(self.modalities)] = out.logits
        phi = shapley_logits(values, self.modalities)
        c, r, s = self.coefficients(phi, batch.labels, ctx.epoch)
        logits = sum(scale_grad(phi[m], c[i]) for i, m in enumerate(self.modalities))
        loss = F.cross_entropy(logits, batch.labels)
        logs = {}
        for i, m in enumerate(self.modalities):
            logs[f"coeff_{m}"], logs[f"ratio_{m}"], logs[f"score_{m}"] = c[i], r[i], s[i]
        return LossOutput(loss, ModelOutput(logits, out.features, out.unimodal_logits), logs)

    # ------------------------------------------------------------------------ clipping
    def after_backward(self, model, batch, result, ctx):
        o = self.options
        if o.clip_norm <= 0:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        trigger = [p.grad for p in model.fusion.parameters() if p.dim() >= 2 and p.grad is not None]
        if not params or not trigger:
            return
        with torch.no_grad():
            over = torch.stack([g.detach().abs().max().float() for g in trigger]).max() > o.clip_threshold
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                         for p in params]))
            factor = torch.where(over, (o.clip_norm / (norm + 1e-6)).clamp_max(1.0), torch.ones_like(norm))
            for p in params:
                p.grad.mul_(factor.to(p.grad.dtype))
        result.logs["clipped"] = over.float()
