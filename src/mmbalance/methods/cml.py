"""CML: Calibrating Multimodal Learning (confidence must not grow when a modality is removed).

Paper: Huan Ma, Qingyang Zhang, Changqing Zhang, Bingzhe Wu, Huazhu Fu, Joey Tianyi Zhou,
Qinghua Hu, "Calibrating Multimodal Learning", ICML 2023 (PMLR v202). Code read:
QingyangZhang/CML@9d2496e (``miwae/train.py``: ``get_multi_mask``, the stage-2 loop with
``rank_loss``; ``readme.md``) -- tabular MIWAE/CPM models only; spec ``baselines.md`` §4.19.

Computation (the code's loss, generalised to encoders; DECISION of the spec):

* every encoder runs once; for each sample a uniformly random removal order ``pi`` of the M
  modalities is drawn; the nested inputs are ``inputs_0`` = all modalities and ``inputs_k`` =
  ``inputs_{k-1}`` with modality ``pi_k`` removed (k = 1..M-1), removal = **feature-level
  zero-out** (the removed modality's encoder features replaced by zeros before the fusion);
* ``logits_k = fuse(inputs_k)``, ``conf_k = max softmax``, ``pred_k = argmax``;
* ``L_cls = mean_k CE(logits_k, y)`` (``cls_loss="nested"``);
* ``L_rank = sum_k sum_i [ReLU((conf_{k+1} - conf_k) [pred_k = y] - eps)
  + ReLU((conf_{k+1} - sg(conf_k)) [pred_{k+1} != y and pred_k != y] - eps)]`` -- summed over the
  batch (trick 1: a correct prediction must not become more confident with less information;
  trick 2: a wrong one neither, with the fuller input's confidence detached);
* ``L = L_cls + (beta / 100) L_rank``; beta = 10 (i.e. 0.1 x the sum), eps = 0, both tricks.

Logged: ``loss_cls``, ``loss_rank``. The fused (all-modality) logits are the training output and
the prediction (nothing changes at evaluation).

Decisions and deviations:

* Removal: the code replaces removed views by the data *mean* (tabular inputs); we zero the
  encoder features (mmbalance's ``zero_out`` convention; spec DECISION).
* The code's first stage (MIWAE reconstruction) is model-specific and not reproduced.
* Random orders: one CPU generator per step seeded from ``(train.seed, global step, rank)``
  (:func:`mmbalance.functional.cml.step_seed`) -- reproducible, independent of the global RNG.
* Options kept for the other readings: ``cls_loss="full"`` (only the all-modality CE, as the
  fused part of the peer's loss), ``trick1`` / ``trick2`` switches, ``epsilon``.
  ``beta=0, cls_loss=full`` is plain joint training (the no-op configuration).
* Processes: the ranking loss is a per-process sum over the local batch (as the code's sum over
  its batch); DDP averages the gradients, so the scale is that of one process's batch.
* M > 2: the nested chain has M inputs (M-1 removals); M = 2 is the code's two-view case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..functional.cml import (
    nested_keep_masks,
    random_removal_positions,
    ranking_loss,
    step_seed,
)
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method


@dataclass
class CMLOptions:
    beta: float = 10.0  # L = L_cls + beta / 100 * L_rank (the code's scaling)
    epsilon: float = 0.0  # margin inside the ReLUs
    cls_loss: str = "nested"  # nested (mean CE over the M nested inputs) | full (all-modality CE only)
    trick1: bool = True  # correct predictions must not gain confidence when a modality is removed
    trick2: bool = True  # wrong predictions neither (fuller confidence detached)

    def validate(self):
        errs = []
        if self.beta < 0:
            errs.append(f"beta must be >= 0 (weight of the ranking loss), got {self.beta}")
        if self.epsilon < 0:
            errs.append(f"epsilon must be >= 0, got {self.epsilon}")
        if self.cls_loss not in ("nested", "full"):
            errs.append(f"cls_loss must be 'nested' or 'full', got '{self.cls_loss}'")
        return errs


@register_method("cml", paper="Ma, Zhang et al., ICML 2023 (CML)", kind="objective",
                 description="calibration ranking: confidence must not increase when modalities are removed (nested, random order)")
class CML(Method):
    Options = CMLOptions

    def removal_positions(self, batch_size: int, ctx) -> torch.Tensor:
        """``pos [B, M]`` of this step (see :func:`random_removal_positions`)."""
        gen = torch.Generator().manual_seed(step_seed(ctx.seed, ctx.global_step, D.rank()))
        return random_removal_positions(batch_size, len(self.modalities), gen)

    def nested_logits(self, model, feats, positions):
        """``[logits_0, ..., logits_{M-1}]`` with features zeroed per row by the nested masks."""
        masks = nested_keep_masks(positions.to(next(iter(feats.values())).device))
        out = [model.fuse(feats)]
        for keep in masks[1:]:
            out.append(model.fuse({m: feats[m] * keep[:, j:j + 1].to(feats[m].dtype)
                                   for j, m in enumerate(self.modalities)}))
        return out

    def compute_loss(self, model, batch, ctx):
        o = self.options
        feats = model.encode(batch.inputs)
        y = batch.labels
        logits = self.nested_logits(model, feats, self.removal_positions(y.shape[0], ctx))
        if o.cls_loss == "nested":
            cls = torch.stack([F.cross_entropy(l, y) for l in logits]).mean()
        else:
            cls = F.cross_entropy(logits[0], y)
        rank = ranking_loss(logits, y, o.epsilon, o.trick1, o.trick2)
        loss = cls + (o.beta / 100.0) * rank
        out = ModelOutput(logits[0], feats, model.head_logits(feats))
        return LossOutput(loss, out, {"loss_cls": cls.detach(), "loss_rank": rank.detach()})
