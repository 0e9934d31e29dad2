"""G-Blending: Gradient-Blending with online or offline weight estimation.

Paper: Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?",
CVPR 2020 (arXiv 1905.12681). **No official code** (spec ``baselines.md`` §4.5); the spec was
written from two re-implementations: timeseriesAI/tsai@41e3107 ``tsai/callback/gblend.py``
(``GBlend``, ``GBlendLoss``; unofficial, "based on" the paper) and the peer
BalanceBenchmark@4c1482f ``GBlending_trainer.py::super_epoch_origin``. The paper itself was not
read; this module follows the spec.

Model: the run's model with M unimodal heads ``h_m`` (switched on here) next to the fused
classifier. Loss: ``L = sum_k w_k CE(logits_k, y)`` over the heads ``k in {m_1..m_M, fused}``
with ``sum_k w_k = 1`` (:func:`mmbalance.functional.gblend.blended_loss`); evaluation uses the
fused classifier.

Weight estimate (the paper's overfitting-to-generalisation ratio, tsai's rule): the training
split minus a held-out V (``holdout`` = 10 % of train, stratified, fixed for the run: gap B) is
T'. From the current weights, for each head k a **copy** of the model is trained for
``super_epoch`` epochs on T' (train transforms, ``ctx.train_batches()``: gap C) with only that
head's cross-entropy and a fresh optimiser of the run's config (``ctx.make_optimizer``): for a
unimodal head the copy is encoder m + head m (the other modalities are absent, as tsai trains
the sub-model); for the fused head the whole network through the fused classifier. Mean losses
on T' (eval transforms, ``ctx.train_eval_batches()``) and on V (``ctx.holdout_batches()``)
before (``LT1, LV1``, from the current model) and after (``LT2, LV2``, from the copy) give
``dG = max(0, LV1 - LV2)``, ``dO = (LV2 - LT2) - (LV1 - LT1)``,
``w = max(1e-8, dG / max(1e-8, dO^2))``, normalised (:func:`~mmbalance.functional.gblend.blend_weights`).

* ``mode=online``: uniform weights ``1/(M+1)`` for ``warmup_epochs`` (10) epochs, then an
  estimate at the start of epoch ``warmup_epochs`` and every ``super_epoch`` (5) epochs after; the blended model
  trains with each estimate's weights until the next.
* ``mode=offline``: one estimate at the start of training (from the initial weights, copies
  trained ``super_epoch`` epochs), used for the whole run.

Decisions (spec §4.5 DECISION): tsai's rule (means, clamps), V from the method holdout (gap B;
never val or test -- the peer uses the test set), separate unimodal heads (not the W-split of
the fused head, as the peer), ``mode=online|offline``, ``super_epoch=5``, ``warmup_epochs=10``, copies
trained with a fresh optimiser of the run's config, initial weights uniform ``1/(M+1)``.

Deviations and notes:

* Copies are built and discarded inside one ``on_epoch_start``: nothing of them outlives the
  hook, so nothing is checkpointed but the weights; a resumed run repeats an estimate bit for
  bit (the copies' shuffles come from ``ctx.train_batches``' (seed, epoch, pass) seeding, the
  global RNGs are re-seeded at every epoch start).
* The copies train at the run's base ``optim.lr`` (a fresh optimiser; the main LR schedule
  does not apply to them); gradient clipping (``train.grad_clip``) applies as in the main step.
* Under DDP each process trains its copy on its shard with the copy's gradients averaged
  across processes every step (what DDP would do), so every process gets the same weights; the
  T' means are summed across processes.
* The offline estimate trains the copies ``super_epoch`` epochs (the paper trains the
  unimodal/multimodal models separately to estimate; the spec gives no length).
* Cost: each estimate trains M+1 copies for ``super_epoch`` epochs on 90 % of train (the
  unimodal copies run one encoder each) plus two loss passes per head. Measured on the synthetic
  quick-bench default (20 epochs, 1 CPU thread): a step costs 1.18x joint's (the unimodal heads),
  one estimate about 10 joint epochs, so an online run (2 estimates) about 2x joint's training
  time and an offline run (1 estimate) about 1.6x.
* The rule degenerates when every head's V loss rises during the look-ahead (``dG = 0`` for all
  heads): all raw weights clamp to 1e-8 and the weights are uniform again (seen on the
  synthetic default after its 10-epoch warm-up).
* fp16 (``train.precision=fp16``): the copies run under autocast without a gradient scaler.
* M > 2: natural (one weight per head).

Logs: ``coeff_{m}`` and ``coeff_fused`` (the weights used in the epoch), ``loss_{m}`` /
``loss_fused``; in an epoch that starts with an estimate also ``gblend_dG_{k}``,
``gblend_dO_{k}``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.gblend import blend_weights, blended_loss
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method

MODES = ("online", "offline")
FUSED = "fused"


@dataclass
class GBlendOptions:
    mode: str = "online"  # online (re-estimate every super_epoch after warmup) | offline (once, at the start)
    super_epoch: int = 5  # epochs each estimate's copies train, and (online) between estimates (tsai n[1])
    warmup_epochs: int = 10  # online: epochs with uniform weights before the first estimate (tsai n[0])
    holdout: float = 0.1  # fraction of train held out as V (tsai V_pct); data.method_holdout overrides

    def validate(self):
        errs = []
        if self.mode not in MODES:
            errs.append(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.super_epoch < 1:
            errs.append(f"super_epoch must be >= 1, got {self.super_epoch}")
        if self.warmup_epochs < 0:
            errs.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 < self.holdout < 0.5:
            errs.append(f"holdout must be a fraction in (0, 0.5) of train, got {self.holdout}")
        return errs


@register_method("gblend", paper="Wang, Tran, Feiszli, CVPR 2020", kind="objective",
                 description="G-Blending: per-head loss weights from look-ahead copies' overfitting-to-"
                             "generalisation ratio on a held-out part of train (online or offline)")
class GBlend(Method):
    Options = GBlendOptions
    state_attrs = ("weights", "estimates")

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        if FUSED in self.modalities:
            raise MethodSetupError(f"gblend names the fused head '{FUSED}'; a modality may not have that name")
        #: the heads, in the order of ``weights``: every modality, then the fused classifier
        self.heads: List[str] = self.modalities + [FUSED]
        self.weights: List[float] = [1.0 / len(self.heads)] * len(self.heads)
        self.estimates = 0
        self._last: Optional[Dict[str, torch.Tensor]] = None

    def configure_model(self, model_cfg):
        model_cfg.unimodal_heads = True

    def holdout_fraction(self) -> float:
        return self.options.holdout

    # ------------------------------------------------------------------------------- schedule
    def estimates_at(self, epoch: int) -> bool:
        o = self.options
        if o.mode == "offline":
            return epoch == 0
        return epoch >= o.warmup_epochs and (epoch - o.warmup_epochs) % o.super_epoch == 0

    def on_epoch_start(self, model, ctx):
        self._last = None
        if self.estimates_at(ctx.epoch):
            self._last = self.estimate(model, ctx)
            self.weights = [float(w) for w in self._last["weights"]]
            self.estimates += 1

    # ------------------------------------------------------------------------------- losses
    def head_losses(self, model, inputs, labels, heads) -> Dict[str, torch.Tensor]:
        """Mean CE of each head in ``heads`` (a unimodal head runs only its own encoder)."""
        mods = self.modalities if FUSED in heads else [h for h in heads if h != FUSED]
        feats = model.encode(inputs, mods)
        out = {}
        for h in heads:
            logits = model.fuse(feats) if h == FUSED else model.heads[h](feats[h])
            out[h] = F.cross_entropy(logits.float(), labels)
        return out

    @torch.no_grad()
    def mean_losses(self, model, batches, heads, ctx, reduce: bool) -> torch.Tensor:
        """Per-head mean CE over ``batches`` in eval mode, ``[len(heads)]`` float64 (summed across
        processes when ``reduce``: a sharded pass)."""
        was = model.training
        model.eval()
        sums = torch.zeros(len(heads) + 1, dtype=torch.float64)
        try:
            for b in batches:
                with ctx.autocast():
                    ls = self.head_losses(model, b.inputs, b.labels, heads)
                n = len(b)
                sums[:-1] += torch.stack([ls[h].detach().double().cpu() for h in heads]) * n
                sums[-1] += n
        finally:
            model.train(was)
        if reduce:
            sums = D.all_reduce_sum(sums)
        if sums[-1] == 0:
            raise RuntimeError("gblend: an empty loss pass (no rows in T' or V)")
        return sums[:-1] / sums[-1]

    def _copy_params(self, copy_model, head: str):
        if head == FUSED:
            params = [p for n, p in copy_model.named_parameters() if not n.startswith("heads.")]
        else:
            params = list(copy_model.encoder_parameters(head)) + list(copy_model.head_parameters(head))
        return [p for p in params if p.requires_grad]

    def train_copy(self, model, head: str, ctx):
        """A copy of ``model`` trained ``super_epoch`` epochs on T' with only ``head``'s CE."""
        clone = copy.deepcopy(model)
        clone.train()
        params = self._copy_params(clone, head)
        opt = ctx.make_optimizer(params)
        ws = D.world_size()
        for _ in range(self.options.super_epoch):
            for b in ctx.train_batches():
                with ctx.autocast():
                    loss = self.head_losses(clone, b.inputs, b.labels, [head])[head]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if ws > 1:  # average the copy's gradients across processes, as DDP would
                    live = [p for p in params if p.grad is not None]
                    flat = D.all_reduce_sum(torch.cat([p.grad.flatten() for p in live])) / ws
                    i = 0
                    for p in live:
                        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
                        i += p.numel()
                ctx.clip_grad(params)
                opt.step()
        return clone

    def estimate(self, model, ctx) -> Dict[str, torch.Tensor]:
        """One G-Blend estimate from the current model (see the module docstring)."""
        heads = self.heads
        lt1 = self.mean_losses(model, ctx.train_eval_batches(), heads, ctx, reduce=True)
        lv1 = self.mean_losses(model, ctx.holdout_batches(), heads, ctx, reduce=False)
        lt2 = torch.zeros_like(lt1)
        lv2 = torch.zeros_like(lv1)
        for i, h in enumerate(heads):
            clone = self.train_copy(model, h, ctx)
            lt2[i] = self.mean_losses(clone, ctx.train_eval_batches(), [h], ctx, reduce=True)[0]
            lv2[i] = self.mean_losses(clone, ctx.holdout_batches(), [h], ctx, reduce=False)[0]
            del clone
        return blend_weights(lt1, lv1, lt2, lv2)

    def compute_loss(self, model, batch, ctx):
        out: ModelOutput = model(batch.inputs)
        losses = {m: F.cross_entropy(out.unimodal_logits[m], batch.labels) for m in self.modalities}
        losses[FUSED] = F.cross_entropy(out.logits, batch.labels)
        stacked = torch.stack([losses[h] for h in self.heads])
        loss = blended_loss(stacked, torch.tensor(self.weights, dtype=stacked.dtype))
        return LossOutput(loss, out, {f"loss_{h}": v.detach() for h, v in losses.items()})

    def on_epoch_end(self, model, ctx):
        logs = {f"coeff_{h}": w for h, w in zip(self.heads, self.weights)}
        if self._last is not None:
            for i, h in enumerate(self.heads):
                logs[f"gblend_dG_{h}"] = float(self._last["dG"][i])
                logs[f"gblend_dO_{h}"] = float(self._last["dO"][i])
        return logs
