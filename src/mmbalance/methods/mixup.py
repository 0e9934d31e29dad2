"""MM and B-MM: Multimodal Mixup and Balanced Multimodal Mixup.

Paper: Ma, Ding, Chen, "Mixup Helps Understanding Multimodal Video Better" (MM: Eq. 3;
B-MM: Eqs. 5-8). Code followed: none -- there is no public code for MM/B-MM (spec §3.1); this
follows the paper and the spec,
with the training conventions of the same authors' data-remixing code (spec §2.3).

MM (``mm``), per training batch: ``perm = randperm(B)``; every modality's feature is mixed with
its partner's, ``z~_m = lam z_m + (1 - lam) z_m[perm]``; fused logits ``model.fuse(z~)``;
loss ``lam CE(logits, y) + (1 - lam) CE(logits, y[perm])``. No detach anywhere, no mixing at
evaluation.

B-MM (``bmm``): per-modality scores ``s_i^m = softmax(l^m_i)[y_i]`` from the fusion's own
per-modality logits (``model.modality_logits``: W-split with b/M for concat fusion, branches for
sum/late), under ``no_grad``; ``rho_m = sum_i s_i^m / sum_i s_i^other`` over the whole training
set at the end of every epoch, used in the **next** epoch; Eq. 7's ``lam = tanh(alpha rho_strong)``;
only the weak modality is mixed (strong untouched), and by default ``lam`` weights the
**partner**: ``z~_w = (1 - lam) z_w + lam z_w[perm]``, loss
``(1 - lam) CE(logits, y) + lam CE(logits, y[perm])``. The first ``warmup_epochs`` epochs are
plain cross-entropy with no mixing (rho is still computed).

Decisions and deviations (each a switch where one exists):
* MM's lambda: the reported MM numbers use a **fixed** lambda (Table 3); Eq. 3 samples
  ``Beta(gamma, gamma)`` per batch. ``lambda_mode=fixed`` (default, ``lam=0.3``; 0.1 preset for
  ``kinetics_sounds``) or ``lambda_mode=beta`` with ``gamma`` (default 1.0, not reported).
* MM's ``lam`` is restricted to **[0, 0.5]** (``validate()`` rejects the rest). With a
  random-permutation partner, ``lam`` and ``1 - lam`` are the same run: row i mixed at ``lam``
  with partner ``perm[i]`` is row ``perm[i]`` mixed at ``1 - lam`` with partner ``perm^-1``, and
  ``perm^-1`` is as likely as ``perm``; so Table 3's ``lam``/``1 - lam`` gaps (CREMA-D 0.3: 64.65 vs
  0.7: 58.06; KS 0.1: 50.89 vs 0.9: 47.42) cannot come from Eq. 3 and are unexplained. The presets
  0.3 / 0.1 are the values the paper's MM numbers report, *not* a best value under Eq. 3: they
  are the same runs as that table's low-end entries (CREMA-D 0.7, its second worst; KS 0.9, its
  worst). ``lambda_mode=beta`` is symmetric, so it needs no range.
* Where to mix: before fusion, per modality (Eq. 3), for every fusion, so MM and B-MM share one
  path (the text's "aggregated multimodal feature" coincides for concat fusion).
* MM ``warmup_epochs`` (default 0 = the paper): optional plain-CE epochs before mixing, an
  addition so both mixup methods take the same switch.
* B-MM's orientation, ``lambda_weights`` (issue 8; spec §3.1.2 item 7): ``partner`` (default)
  gives Eq. 7's ``lam`` to the partner, in the feature **and** in the label, so the target puts
  on each sample exactly its share of the mixed feature: ``1 - lam`` on the row's own label (the
  label its unmixed strong modality carries) and ``lam`` on the partner's. ``own`` = Eq. 8 as
  printed (``lam`` on the row's own feature and label). With alpha in [0.1, 0.3], ``own`` gives
  the row only 10-30 %, so the *unmixed* modality is trained on a target that is 70-90 % another
  sample's label and falls to chance; rho then flips every epoch (synthetic default, seed 0,
  after warm-up: rho_x1 alternates 0.53-0.90 / 1.52-1.74, the strong modality changes in all 10
  epochs, the unmixed modality's val zero-out accuracy is 0.19-0.24; ``partner``: rho_x1
  1.36-1.42, no change, val zero-out x1 >= 0.79, x2 >= 0.63; docs/bmm_rho_trace.md). The text
  supports ``partner`` ("alpha controls the degree of mixup", "a large alpha leads to overly
  aggressive mixing", "neighbourhood samples", Fig. 5's "almost no degradation" of the strong
  modality), and Eq. 7's "0 otherwise" then literally means no mixing (continuous at rho = 1).
  Caveat: under ``partner``, ``tanh(alpha rho) > 0.5`` hands the partner the larger share of the
  target -- the same failure as ``own`` at small lambda; with alpha 0.1 / 0.3 that takes
  rho > 5.5 / 1.83 (Table 5's alpha 0.7-0.9 would be past it for any rho > 1).
* Logged values: B-MM's ``lambda`` is Eq. 7's value (0 = nothing mixed), ``own_weight`` the
  weight of a row's own feature and label in the mixed modality (1 = nothing mixed); the same with
  a ``next_`` prefix at epoch end, with ``rho_<modality>``. MM's ``lambda`` is Eq. 3's (own weight).
* B-MM's rho source: ``rho_source=online`` (default) accumulates the score sums during the
  epoch's training forward passes on the **un-mixed** features (train mode, before each step);
  ``rho_source=eval_pass`` runs a ``no_grad`` eval-mode pass over the training split with eval
  transforms at epoch end (:func:`bmm_rho_eval_pass`), the literal "rho of the model after each
  epoch". Both reduce the sums over processes with :func:`mmbalance.distributed.all_reduce_sum`.
  Kept ``online`` after measuring both (synthetic default, seeds 0-2, ``partner``): the same
  best checkpoint and test accuracy, post-warm-up mean val accuracy within 0.001, lambda within
  0.02; the eval-pass rho is a single end-of-epoch snapshot and 3-6x noisier from epoch to epoch
  (sd of rho_x1 0.055-0.071 vs 0.010-0.021), and it costs an extra pass over the training split
  (a full decode pass on media datasets). Under ``own`` both flip every epoch: the flip is the
  orientation, not the rho source.
* Eq. 7's "0 otherwise" is read as "no mixing for that modality"; with ``rho == 1`` nothing is
  mixed. Larger imbalance gives a larger lambda, i.e. (``partner``) *stronger* mixing of the
  weak modality.
* With no rho yet (``warmup_epochs=0``: the first epoch) the epoch is plain training.
* Warm-up length: default 10 (C-REMIX), 5 preset for ``kinetics_sounds``; alpha default 0.1,
  0.3 preset for ``kinetics_sounds`` (Tables 4-5).
* EXTENSION (not in the paper), M > 2: ``rho_m = S_m / max_{k != m} S_k``; every modality with
  ``rho <= 1`` relative to the strongest is mixed with the strongest modality's lambda
  ``tanh(alpha rho_strong)`` (rho_strong = its ratio to the runner-up). Identical for M = 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..data.batch import Batch
from ..functional.mixup import (bmm_lambdas, discrepancy, mix_features, mixed_cross_entropy,
                                own_weight, random_permutation, sample_lambda, score_sums)
from ..models.multimodal import ModelOutput, MultimodalModel
from .base import LossOutput, Method, register_method


# --------------------------------------------------------------------------------------- MM
@dataclass
class MMOptions:
    tune_space = {"lam": ("float", 0.05, 0.5)}  # mmbalance tune ranges (ours; the spec gives none)
    lambda_mode: str = "fixed"  # fixed | beta
    lam: float = 0.3  # fixed lambda in [0, 0.5]; the paper's choice (CREMA-D 0.3, KS 0.1), = its 0.7 / 0.9 runs
    gamma: float = 1.0  # Beta(gamma, gamma) for lambda_mode=beta (not reported)
    warmup_epochs: int = 0  # plain-CE epochs before mixing (not in the paper: 0 = paper)

    def validate(self):
        errs = []
        if self.lambda_mode not in ("fixed", "beta"):
            errs.append(f"lambda_mode must be fixed or beta, got '{self.lambda_mode}'")
        if not 0.0 <= self.lam <= 0.5:
            errs.append(f"lam must be in [0, 0.5], got {self.lam}: with a random-permutation partner, lam and "
                        "1 - lam train on the same mixed pairs (row i at lam is row perm[i] at 1 - lam), so a "
                        "lam above 0.5 is the run at 1 - lam")
        if not self.gamma > 0:
            errs.append(f"gamma must be > 0, got {self.gamma}")
        if self.warmup_epochs < 0:
            errs.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        return errs


def _mixed_step(model: MultimodalModel, batch: Batch, mixed: Sequence[str], own: float) -> LossOutput:
    """Encode, mix the modalities in ``mixed`` with a random partner, fuse, mixed CE. ``own`` is
    the weight of each row's own feature **and** label (the partner gets ``1 - own``)."""
    feats = model.encode(batch.inputs)
    if not mixed:
        logits = model.fuse(feats)
        return LossOutput(F.cross_entropy(logits, batch.labels), ModelOutput(logits, feats, {}))
    perm = random_permutation(len(batch), batch.labels.device)
    logits = model.fuse(mix_features(feats, perm, {m: own for m in mixed}))
    loss = mixed_cross_entropy(logits, batch.labels, perm, own)
    # training accuracy against the label with the larger weight in the mixed target
    labels = batch.labels if own >= 0.5 else batch.labels[perm]
    return LossOutput(loss, ModelOutput(logits, feats, {}), labels=labels)


@register_method("mm", paper="Ma et al., Mixup Helps Understanding Multimodal Video Better (MM, Eq. 3)", kind="data",
                 description="multimodal mixup: mix every modality's feature and the labels with a batch partner")
class MM(Method):
    Options = MMOptions
    presets = {"kinetics_sounds": {"method": {"lam": 0.1}}}  # Table 3's reported choice (= its 0.9 entry)

    def compute_loss(self, model, batch, ctx):
        o = self.options
        lam = 1.0 if ctx.epoch < o.warmup_epochs else sample_lambda(o.lambda_mode, o.lam, o.gamma)
        result = _mixed_step(model, batch, model.modalities if lam < 1.0 else (), lam)
        result.logs["lambda"] = lam
        return result


# --------------------------------------------------------------------------------------- B-MM
@dataclass
class BMMOptions:
    tune_space = {"alpha": ("log", 0.03, 1.0)}  # mmbalance tune ranges (ours; Table 5 uses 0.1-0.3)
    alpha: float = 0.1  # lambda = tanh(alpha * rho) (Table 5: CREMA-D 0.1, Kinetics-Sounds 0.3)
    warmup_epochs: int = 10  # plain CE epochs (C-REMIX 10; Table 4: Kinetics-Sounds 5)
    rho_source: str = "online"  # online | eval_pass
    lambda_weights: str = "partner"  # partner | own: which sample Eq. 7's lambda weights (own = Eq. 8 as printed)

    def validate(self):
        errs = []
        if self.rho_source not in ("online", "eval_pass"):
            errs.append(f"rho_source must be online or eval_pass, got '{self.rho_source}'")
        if self.lambda_weights not in ("partner", "own"):
            errs.append(f"lambda_weights must be partner or own, got '{self.lambda_weights}'")
        if self.alpha <= 0:
            errs.append(f"alpha must be > 0, got {self.alpha}")
        if self.warmup_epochs < 0:
            errs.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        return errs


def bmm_rho_eval_pass(model: MultimodalModel, batches: Iterable[Batch], autocast=None) -> Dict[str, float]:
    """rho over the training set from a ``no_grad`` eval-mode pass over ``batches`` (this
    process's shard under DDP; the score sums are added over processes with the reducer).
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(model.modalities), dtype=torch.float64)
    device = None
    try:
        with torch.no_grad():
            for batch in batches:
                ctx = autocast() if autocast is not None else None
                if ctx is not None:
                    with ctx:
                        feats = model.encode(batch.inputs)
                else:
                    feats = model.encode(batch.inputs)
                feats = {m: z.float() for m, z in feats.items()}
                s = score_sums(model.modality_logits(feats), batch.labels)
                device = s.device
                sums = sums.to(device) + s
    finally:
        model.train(was_training)
    if device is None:
        device = next(model.parameters()).device
    sums = D.all_reduce_sum(sums.to(device))
    return discrepancy({m: float(v) for m, v in zip(model.modalities, sums.cpu())})


@register_method("bmm", paper="Ma et al., Mixup Helps Understanding Multimodal Video Better (B-MM, Eqs. 5-8)", kind="data",
                 description="balanced mixup: mix only the weak modality, lambda = tanh(alpha * rho) from the epoch's discrepancy")
class BMM(Method):
    Options = BMMOptions
    presets = {"kinetics_sounds": {"method": {"alpha": 0.3, "warmup_epochs": 5}}}
    state_attrs = ("rho",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        #: rho of the last finished epoch (used for the current epoch); None before the first
        self.rho: Optional[Dict[str, float]] = None
        self._sums: Optional[torch.Tensor] = None

    def mixing_plan(self, epoch: int) -> Dict[str, float]:
        """The modalities mixed in ``epoch`` and Eq. 7's lambda (empty: plain training)."""
        if epoch < self.options.warmup_epochs or self.rho is None:
            return {}
        return bmm_lambdas(self.rho, self.options.alpha)

    def _weights(self, plan: Dict[str, float]) -> Dict[str, float]:
        """Logged values: Eq. 7's ``lambda`` (0 = nothing mixed) and ``own_weight``, the weight of
        a row's own feature and label in the mixed modality (1 = nothing mixed)."""
        lam = next(iter(plan.values())) if plan else 0.0
        return {"lambda": lam, "own_weight": own_weight(lam, self.options.lambda_weights) if plan else 1.0}

    def on_epoch_start(self, model, ctx):
        self._sums = None

    def compute_loss(self, model, batch, ctx):
        plan = self.mixing_plan(ctx.epoch)
        weights = self._weights(plan)
        result = _mixed_step(model, batch, tuple(plan), weights["own_weight"])
        if self.options.rho_source == "online":  # Eq. 5 on the un-mixed features, no grad
            with torch.no_grad():
                feats = {m: z.detach().float() for m, z in result.output.features.items()}
                s = score_sums(model.modality_logits(feats), batch.labels)
            self._sums = s if self._sums is None else self._sums + s
        result.logs.update(weights)
        return result

    def on_epoch_end(self, model, ctx):
        if self.options.rho_source == "eval_pass":
            self.rho = bmm_rho_eval_pass(model, ctx.train_eval_batches(), ctx.autocast)
        else:
            local = self._sums if self._sums is not None else torch.zeros(len(model.modalities), dtype=torch.float64,
                                                                          device=ctx.device)
            sums = D.all_reduce_sum(local)
            self.rho = discrepancy({m: float(v) for m, v in zip(model.modalities, sums.cpu())})
        self._sums = None
        logs = {f"rho_{m}": v for m, v in self.rho.items()}
        logs.update({f"next_{k}": v for k, v in self._weights(bmm_lambdas(self.rho, self.options.alpha)).items()})
        return logs
