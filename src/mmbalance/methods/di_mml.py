"""DI-MML: Detached and Interactive Multimodal Learning (two stages in one run).

Paper: Fan et al. (Yunfeng Fan, first author of PMR), *Detached and Interactive Multimodal
Learning*, ACM MM 2024 -- **the paper was not read** (spec ``baselines.md`` §4.22). Code followed:
fanyunfeng-bit/DI-MML@83b9b7a -- ``main_CFT.py`` (``train_epoch``, ``get_indices``, ``main``),
``main_CFT_stage2.py`` (``train_combine_classifier_epoch``, ``valid_combine_classifier``),
``loss/contrast_loss.py``, ``models/basic_model.py``, ``run.sh``. Math in ``functional/di_mml.py``.

Stage 1 (epochs ``0 .. S1-1``): M unimodal networks trained side by side -- each encoder with its
own head ``h_m`` (``model.heads``) -- plus one shared classifier ``C`` (``model.extras["aligner"]``,
``Linear(d, K)``) applied to every modality's feature::

    L = sum_m CE(h_m(z_m), y) + align_weight * sum_m CE(C(z_m), y) + duc_weight * L_DUC

``L_DUC`` (from epoch ``duc_epoch`` on): at the start of that epoch, once, the exclusive dimensions
are selected on the whole training split (eval mode, eval transforms, ``ctx.train_eval_batches()``):
``acc_m[d]`` = accuracy of "nearest class mean in dimension d", ``top_m = {d : acc_m[d] > mean_d
acc_m}``, ``E_m = top_m`` minus every other modality's ``top_j``; then per batch
``L_DUC = sum_m sum_{j != m} InfoNCE(z_j[E_m], z_m[E_m].detach(); tau)`` (raw dot products,
unidirectional: the other modalities learn m's exclusive dimensions, no gradient reaches z_m).

Stage 2 (epochs ``S1 .. E-1``): encoders, heads and the shared classifier are frozen (no gradient,
encoders run in eval mode) and only the fusion head (``model.fusion``, the config's, concat by
default) is trained with ``CE(fusion(z), y)``; at the switch the main optimiser and its LR schedule
are replaced by fresh ones (``ctx.reset_optimizer()``: the code starts stage 2 with a new SGD).

Prediction: per sample, the confidence-weighted ensemble ``sum_k softmax_k(c_k / T2) o_k`` with
``c_k = max softmax(o_k)`` over ``o_k in {h_m(z_m)} (+ fusion(z) in stage 2)``.

Options and defaults (code): ``tau=50`` (CREMA-D; presets ``ave`` and ``ucf101`` 10),
``ensemble_temperature`` T2 = 1 (CREMA-D, UCF; preset ``ave`` 3), ``align_weight=1``,
``duc_weight=1`` (the code has no weight), ``stage2_epochs`` and ``duc_epoch`` (see below). The
code's SGD lr 1e-3, momentum 0.9, wd 1e-4, batch 16, StepLR(70, 0.1) are the run config's business.

Decisions and deviations:

* DECISION (spec): the code's semantics, as one mmbalance run: stage 1 for ``S1 = train.epochs -
  stage2_epochs`` epochs, then stage 2 (switch in ``on_epoch_start``: ``requires_grad=False`` on
  encoders, heads and aligner, ``ctx.reset_optimizer()``).
* Stage lengths: the code runs 150 + 20 epochs and starts ``L_DUC`` at epoch 20. The defaults
  (``-1`` = auto) scale that to the run: ``stage2_epochs = round(train.epochs * 20 / 170)``,
  ``duc_epoch = max(1, round(S1 * 20 / 150))`` (train.epochs = 170 gives the code's 20 and 20). Set
  them explicitly to pin them (extending a run on resume moves the auto values).
* DECISION (spec): dimension selection on ``ctx.train_eval_batches()`` (eval transforms), vectorised
  -- the code loops over the training set one sample at a time.
* DECISION (spec): an empty exclusive set adds nothing (the code evaluates InfoNCE on zero-length
  vectors and adds ``log B``).
* The optimiser keeps two named groups for the whole run, ``unimodal`` (encoders, heads, aligner)
  and ``fusion`` (the spec: "param_groups -> fusion only" in stage 2): frozen parameters get no
  gradient, so only the fusion head moves in stage 2, and a run resumed in stage 2 rebuilds the
  same optimiser layout its checkpoint holds. Gradients of frozen parameters are dropped after
  the backward pass (under DDP an unused parameter could otherwise receive a zero gradient and be
  moved by weight decay).
* Stage-1 prediction (not in the code, which evaluates the unimodal networks separately): the same
  confidence-weighted ensemble over the heads only -- the fusion head is untrained until stage 2.
  The best-validation checkpoint can therefore come from stage 1; ``result.json`` reports it.
* Per-modality evaluation (``zero_out_logits``): each modality's own head ``h_m``.
* The code's unused ``--var`` argument has no counterpart.
* All modalities must have the same feature size (the shared classifier sees every one); else a
  ``MethodSetupError`` names the sizes (set ``model.feature_dim``).
* M > 2 (extension, spec): exclusive dimensions of m are those no other modality has in its top
  set, and every other modality learns them (pairwise terms summed).
* Logged: per batch ``loss_uni_{m}``, ``loss_align_{m}``, ``loss_duc``, ``stage``; per epoch (the
  epoch of the selection) ``dims_{m}`` (size of E_m). State: ``stage`` and the exclusive masks
  (boolean tensors).
* Not split-invariant under DDP: the InfoNCE negatives are the rows of each process's batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.di_mml import (
    confidence_ensemble,
    dimension_accuracy,
    duc_loss,
    exclusive_dimensions,
    top_dimensions,
)
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method
from .relearn import encoder_features

#: the code's schedule: 150 stage-1 epochs (L_DUC from epoch 20), then 20 stage-2 epochs
CODE_STAGE1, CODE_STAGE2, CODE_DUC = 150, 20, 20


def _round(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass
class DIMMLOptions:
    stage2_epochs: int = -1  # epochs of stage 2 (fusion head only); -1 = round(train.epochs * 20 / 170)
    duc_epoch: int = -1  # first epoch with L_DUC (dimensions selected then); -1 = max(1, round(S1 * 20 / 150))
    tau: float = 50.0  # InfoNCE temperature of L_DUC (code: 50 CREMA-D, 10 AVE / UCF)
    align_weight: float = 1.0  # weight of the shared classifier's cross-entropies
    duc_weight: float = 1.0  # weight of L_DUC (code: 1)
    ensemble_temperature: float = 1.0  # T2 of the confidence-weighted prediction (code: 1 CREMA-D/UCF, 3 AVE)
    tune_space = {"tau": ("log", 5.0, 100.0)}  # mmbalance tune ranges (ours; code 10 or 50)

    def validate(self):
        errs = []
        if self.stage2_epochs < -1:
            errs.append(f"stage2_epochs must be >= 0 (or -1 = auto), got {self.stage2_epochs}")
        if self.duc_epoch < -1:
            errs.append(f"duc_epoch must be >= 0 (or -1 = auto), got {self.duc_epoch}")
        if not self.tau > 0:
            errs.append(f"tau must be > 0, got {self.tau}")
        if not self.align_weight >= 0:
            errs.append(f"align_weight must be >= 0, got {self.align_weight}")
        if not self.duc_weight >= 0:
            errs.append(f"duc_weight must be >= 0, got {self.duc_weight}")
        if not self.ensemble_temperature > 0:
            errs.append(f"ensemble_temperature must be > 0, got {self.ensemble_temperature}")
        return errs


DIMML_PRESETS = {"ave": {"method": {"tau": 10.0, "ensemble_temperature": 3.0}},
                 "ucf101": {"method": {"tau": 10.0}}}  # code: UCF-101 tau 10, T2 1


@register_method("di_mml", paper="Fan et al., ACM MM 2024", kind="objective", modalities=">=2",
                 description="DI-MML: unimodal networks with a shared classifier and a dimension-wise "
                             "contrastive term, then a fusion head on the frozen encoders; "
                             "confidence-weighted ensemble")
class DIMML(Method):
    Options = DIMMLOptions
    presets = DIMML_PRESETS
    modality_range = (2, None)
    state_attrs = ("stage", "exclusive")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.stage: int = 1
        #: modality -> boolean mask of its exclusive feature dimensions (empty until selected)
        self.exclusive: dict[str, Tensor] = {}
        self._epoch_logs: dict[str, float] = {}

    # ------------------------------------------------------------------------------ set-up
    def configure_model(self, model_cfg):
        model_cfg.unimodal_heads = True

    def extra_modules(self, model):
        dims = dict(model.feature_dims)
        if len(set(dims.values())) != 1:
            raise MethodSetupError(f"method 'di_mml' applies one shared classifier to every modality's feature, "
                                   f"so all feature sizes must be equal; got {dims} (set model.feature_dim)")
        from ..models.resnet import ogm_init
        aligner = nn.Linear(next(iter(dims.values())), model.num_classes)
        ogm_init(aligner)
        return {"aligner": aligner}

    def param_groups(self, model):
        fusion = list(model.fusion.parameters())
        ids = {id(p) for p in fusion}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": rest, "name": "unimodal"}, {"params": fusion, "name": "fusion"}]

    def boundaries(self, num_epochs: int) -> tuple[int, int]:
        """``(S1, duc_epoch)``: the first stage-2 epoch and the first epoch with L_DUC."""
        o = self.options
        s2 = o.stage2_epochs if o.stage2_epochs >= 0 else _round(num_epochs * CODE_STAGE2 / (CODE_STAGE1 + CODE_STAGE2))
        if s2 > 0 and s2 >= num_epochs:
            raise MethodSetupError(f"method 'di_mml': stage2_epochs={s2} leaves no stage-1 epoch in a "
                                   f"{num_epochs}-epoch run; lower method.stage2_epochs or raise train.epochs")
        s1 = num_epochs - s2
        duc = o.duc_epoch if o.duc_epoch >= 0 else max(1, _round(s1 * CODE_DUC / CODE_STAGE1))
        return s1, duc

    # ------------------------------------------------------------------------------ epochs
    @staticmethod
    def _frozen(model):
        mods = [model.encoders] + ([model.heads] if model.heads is not None else [])
        if getattr(model, "extras", None) is not None and "aligner" in model.extras:
            mods.append(model.extras["aligner"])
        return [p for mod in mods for p in mod.parameters()]

    def on_epoch_start(self, model, ctx):
        s1, duc = self.boundaries(ctx.num_epochs)
        if ctx.epoch < s1:
            self.stage = 1
            if ctx.epoch >= duc and not self.exclusive:
                self.select_dimensions(model, ctx)
            return
        switching = self.stage != 2
        self.stage = 2
        for p in self._frozen(model):
            p.requires_grad_(False)
        if switching:
            ctx.reset_optimizer()

    def on_epoch_end(self, model, ctx):
        logs, self._epoch_logs = self._epoch_logs, {}
        return logs or None

    @torch.no_grad()
    def select_dimensions(self, model, ctx) -> None:
        feats, y, idx = encoder_features(model, ctx.train_eval_batches(), ctx.autocast)
        if D.is_distributed():  # every process's rows, in dataset order
            order = D.all_gather_cat(idx).argsort()
            y = D.all_gather_cat(y)[order]
            feats = {m: D.all_gather_cat(z)[order] for m, z in feats.items()}
        if y.numel() == 0:
            raise RuntimeError("method 'di_mml': the training split is empty; no dimensions to select")
        tops = {m: top_dimensions(dimension_accuracy(feats[m], y, self.num_classes)) for m in self.modalities}
        self.exclusive = exclusive_dimensions(tops)
        self._epoch_logs = {f"dims_{m}": float(self.exclusive[m].sum()) for m in self.modalities}

    # ------------------------------------------------------------------------------ steps
    def predictors(self, model, feats):
        heads = model.head_logits(feats)
        preds = [heads[m] for m in self.modalities]
        if self.stage == 2:
            preds.append(model.fuse(feats))
        return heads, preds

    def compute_loss(self, model, batch, ctx):
        o, y = self.options, batch.labels
        if self.stage == 2:
            enc_mode = model.encoders.training
            with torch.no_grad():
                model.encoders.eval()
                try:
                    feats = model.encode(batch.inputs)
                finally:
                    model.encoders.train(enc_mode)
                heads = model.head_logits(feats)
            fused = model.fuse(feats)
            loss = F.cross_entropy(fused, y)
            logits = confidence_ensemble([heads[m] for m in self.modalities] + [fused.detach()],
                                         o.ensemble_temperature)
            return LossOutput(loss, ModelOutput(logits, feats, heads), {"loss_fusion": loss.detach(), "stage": 2.0})
        feats = model.encode(batch.inputs)
        heads = model.head_logits(feats)
        aligner = model.extras["aligner"]
        logs: dict[str, float | Tensor] = {"stage": 1.0}
        loss = feats[self.modalities[0]].new_zeros(())
        for m in self.modalities:
            l_uni = F.cross_entropy(heads[m], y)
            l_align = F.cross_entropy(aligner(feats[m]), y)
            loss = loss + l_uni + o.align_weight * l_align
            logs[f"loss_uni_{m}"], logs[f"loss_align_{m}"] = l_uni.detach(), l_align.detach()
        if self.exclusive and o.duc_weight > 0:
            l_duc = duc_loss({m: feats[m] for m in self.modalities}, self.exclusive, o.tau)
            loss = loss + o.duc_weight * l_duc
            logs["loss_duc"] = l_duc.detach()
        with torch.no_grad():
            logits = confidence_ensemble([heads[m].detach() for m in self.modalities], o.ensemble_temperature)
        return LossOutput(loss, ModelOutput(logits, feats, heads), logs)

    def after_backward(self, model, batch, result, ctx):
        if self.stage == 2:
            for p in self._frozen(model):
                p.grad = None

    # ------------------------------------------------------------------------------ evaluation
    def predict(self, model, batch):
        feats = model.encode(batch.inputs)
        heads, preds = self.predictors(model, feats)
        return ModelOutput(confidence_ensemble(preds, self.options.ensemble_temperature), feats, heads)

    def zero_out_logits(self, model, output):
        return model.head_logits(output.features)
