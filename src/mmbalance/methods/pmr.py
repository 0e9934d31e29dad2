"""PMR: Prototypical Modal Rebalance.

Paper: Fan, Xu, Wang, Wang, Guo, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
CVPR 2023 (arXiv 2211.07089). Code followed: fanyunfeng-bit/Modal-Imbalance-PMR@3615e48,
``main_Prototype_grad.py`` (``EU_dist``, ``train_epoch``, ``calculate_prototype``, ``main``) and
``bash.sh``; spec ``baselines.md`` §4.2.

Computation:

* At the start of every epoch (= "before epoch 0 and after every epoch" of the code), in eval
  mode and without gradients, the class prototypes ``c_m[k]`` (mean encoder feature of class k)
  are computed for every modality from the first ``ceil(proto_fraction * N)`` rows of
  :meth:`TrainContext.train_eval_batches` (eval transforms, fixed order), with
  :func:`mmbalance.functional.common.class_prototypes`; when previous prototypes exist,
  ``c_m = (1 - momentum) c_m + momentum c_m_prev``.
* Each batch: ``s_m = -||z_m - c_m||`` (Euclidean, not squared; prototypes constant),
  ``score_m = sum_i softmax(s_m)_i[y_i]`` (no grad), ``rho_m = score_m / mean_{j != m} score_j``;
  inside the window ``start_epoch <= epoch <= end_epoch`` (inclusive)
  ``L = CE(fused, y) + sum_m beta_m CE(s_m, y)`` with ``beta_m = alpha`` for the weaker modality
  (``rho_m < 1``) and 0 otherwise; outside it ``L = CE(fused, y)``. ``CE(s_m, y)`` reaches encoder
  m only. Logged: ``ratio_{m}`` (rho_m) and ``coeff_{m}`` (beta_m).

Defaults: the code's argparse (alpha 1.0, window 0..100) except ``momentum = 0.0`` (every run line
of ``bash.sh`` sets ``--momentum_coef 0.0``; the argparse default is 0.2, the peer's 0.5).
Presets (``presets``): CREMA-D alpha 2.0 (concat run lines; the sum-fusion run line uses 5.0 and
film/gated 3.0 -- set ``method.alpha`` for those), AVE alpha 2.0 with window 0..70 (concat/sum
run lines; film/gated use 1.0).

Decisions and deviations (spec §4.2):

* Coefficient: the code's binary rule (``coef="binary"``, default). ``coef="ratio"`` gives
  ``beta_weak = alpha * (1/rho_weak - 1)`` clipped to [0, alpha] -- the paper's ratio-dependent
  coefficient *as recalled*, NOT from the code.
* PER (prototype-entropy regulariser of the dominant modality in early epochs; in the paper's
  abstract, absent from the released code): ``per_weight`` (default 0 = the code) adds
  ``-per_weight * H(softmax(s_m))`` for every modality with ``rho_m > 1`` while
  ``epoch < per_epochs`` (default 0). Exact weights unknown until the PDF is read.
* Prototype source: the code uses the first ``floor(n_batches / 10)`` batches of the *shuffled*
  training loader (train transforms; AVE: the whole validation set). We use the first
  ``ceil(10 %)`` rows of the training split in fixed order with eval transforms (deterministic;
  at least one row), and never the validation set.
* Distance: ``sqrt(sum (z - c)^2 + 1e-12)`` -- ``eps`` inside the root, the code's gradient at
  ``z == c`` is NaN.
* A class absent from the prototype pass: the code gets NaN (0/0). We keep that class's previous
  prototype (or 0 before any) instead.
* M > 2 (not in the paper/code): ``rho_m = score_m / mean_{j != m} score_j`` and ``alpha``
  CE for every modality with ``rho_m < 1`` (for M = 2 exactly the code's rule). The peer's
  3-modality branch (grad scaling + subtracted noise) is not copied.
* Processes: the prototype pass gathers every process's features and labels
  (``all_gather_cat``) before the means, and the per-batch score vector is summed over
  processes (``all_reduce_sum``) before rho, so every replica uses the same prototypes and
  coefficients (global batch, like the code's single process).
* The code's Python double loop for ``EU_dist`` is vectorised (``[B, K, d]`` differences).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..functional.common import class_prototypes
from ..functional.pmr import (
    entropy,
    momentum_prototypes,
    prototype_logits,
    ratios,
    weak_coefficients,
)
from ..functional.scores import true_class_prob
from .base import LossOutput, Method, register_method


@dataclass
class PMROptions:
    tune_space = {"alpha": ("log", 0.25, 4.0)}  # mmbalance tune ranges (presets 1..2)
    alpha: float = 1.0  # weight of the weaker modality's prototype cross-entropy
    start_epoch: int = 0
    end_epoch: int = 100  # inclusive, as the code's modulation_ends
    momentum: float = 0.0  # prototype momentum (code's momentum_coef; run lines 0.0)
    proto_fraction: float = 0.1  # share of the training split used for the prototypes
    coef: str = "binary"  # binary (code) | ratio (paper as recalled, not from the code)
    per_weight: float = 0.0  # prototype-entropy regulariser weight (paper; absent from the code)
    per_epochs: int = 0  # PER applies while epoch < per_epochs
    eps: float = 1e-12  # inside the square root of the distance

    def validate(self):
        errs = []
        if self.alpha < 0:
            errs.append(f"alpha must be >= 0 (weight of a cross-entropy), got {self.alpha}")
        if self.end_epoch < self.start_epoch:
            errs.append(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        if not 0.0 <= self.momentum <= 1.0:
            errs.append(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0.0 < self.proto_fraction <= 1.0:
            errs.append(f"proto_fraction must be in (0, 1], got {self.proto_fraction}")
        if self.coef not in ("binary", "ratio"):
            errs.append(f"coef must be 'binary' or 'ratio', got '{self.coef}'")
        if self.per_weight < 0:
            errs.append(f"per_weight must be >= 0, got {self.per_weight}")
        if self.per_epochs < 0:
            errs.append(f"per_epochs must be >= 0, got {self.per_epochs}")
        if self.eps < 0:
            errs.append(f"eps must be >= 0, got {self.eps}")
        return errs


PMR_PRESETS = {
    "cremad": {"method": {"alpha": 2.0}},
    "ave": {"method": {"alpha": 2.0, "end_epoch": 70}},
}


@torch.no_grad()
def compute_prototypes(model, batches, num_classes: int, max_rows: int | None = None, autocast=None):
    """``({m: [K, d]}, counts [K])`` -- per-class mean features of the first ``max_rows`` rows of
    ``batches`` (this process's share), gathered over processes; eval mode, train/eval flag
    restored."""
    was = model.training
    model.eval()
    feats: dict[str, list] = {m: [] for m in model.modalities}
    labels = []
    seen = 0
    try:
        for batch in batches:
            if max_rows is not None and seen >= max_rows:
                break
            take = batch.labels.shape[0] if max_rows is None else min(batch.labels.shape[0], max_rows - seen)
            if autocast is not None:
                with autocast():
                    z = model.encode(batch.inputs)
            else:
                z = model.encode(batch.inputs)
            for m in model.modalities:
                feats[m].append(z[m][:take].float())
            labels.append(batch.labels[:take])
            seen += take
    finally:
        model.train(was)
    device = next(model.parameters()).device
    y = D.all_gather_cat(torch.cat(labels).to(device) if labels else torch.zeros(0, dtype=torch.long, device=device))
    protos, counts = {}, None
    for m in model.modalities:
        local = torch.cat(feats[m]).to(device) if feats[m] else torch.zeros(0, model.feature_dims[m], device=device)
        protos[m], counts = class_prototypes(D.all_gather_cat(local), y, num_classes)
    return protos, counts


@register_method("pmr", paper="Fan et al., CVPR 2023 (PMR)", kind="objective",
                 description="prototypical cross-entropy (distance to class-mean features) for the weaker modality")
class PMR(Method):
    Options = PMROptions
    presets = PMR_PRESETS
    state_attrs = ("prototypes",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        #: {modality: [K, d]} class prototypes used in the current epoch (None before the first pass)
        self.prototypes: dict[str, torch.Tensor] | None = None

    def on_epoch_start(self, model, ctx):
        o = self.options
        max_rows = None
        if ctx.train_size > 0 and o.proto_fraction < 1.0:
            total = max(1, math.ceil(o.proto_fraction * ctx.train_size))
            max_rows = max(1, math.ceil(total / D.world_size()))
        new, counts = compute_prototypes(model, ctx.train_eval_batches(), self.num_classes, max_rows, ctx.autocast)
        prev = self.prototypes
        self.prototypes = {m: momentum_prototypes(new[m], None if prev is None else prev.get(m), o.momentum, counts)
                           for m in self.modalities}

    def compute_loss(self, model, batch, ctx):
        if self.prototypes is None:
            raise RuntimeError("method 'pmr': no prototypes yet -- on_epoch_start must run before the first step")
        o = self.options
        out = model(batch.inputs)
        y = batch.labels
        loss = F.cross_entropy(out.logits, y)
        sims = {m: prototype_logits(out.features[m].float(), self.prototypes[m].to(out.features[m].device), o.eps)
                for m in self.modalities}
        with torch.no_grad():
            scores = torch.stack([true_class_prob(sims[m], y).sum() for m in self.modalities])  # fp32
            rho = ratios(D.all_reduce_sum(scores.double()))
            active = o.start_epoch <= ctx.epoch <= o.end_epoch
            beta = weak_coefficients(rho, o.alpha, o.coef) if active else torch.zeros_like(rho)
        logs = {}
        for i, m in enumerate(self.modalities):
            pce = F.cross_entropy(sims[m], y)
            loss = loss + beta[i].to(pce.dtype) * pce
            logs[f"ratio_{m}"] = rho[i].float()
            logs[f"coeff_{m}"] = beta[i].float()
            logs[f"loss_proto_{m}"] = pce.detach()
        if o.per_weight > 0 and ctx.epoch < o.per_epochs:
            for i, m in enumerate(self.modalities):
                strong = (rho[i] > 1).to(loss.dtype)
                loss = loss - o.per_weight * strong * entropy(sims[m])
        return LossOutput(loss, out, logs)
