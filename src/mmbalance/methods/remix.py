"""Data Remixing: per-epoch decoupling and re-batching of the training set by modality.

Paper: Ma, Chen, Deng, "Improving Multimodal Learning Balance and Sufficiency through Data
Remixing", ICML 2025 (arXiv 2506.11550). Code read (spec ``baselines.md`` §4.24):
MatthewMaxy/Remix_ICML2025@80898aa -- ``train.py`` (``kl_divergence``, ``remix``, ``train_epoch``,
``special_train_epoch``, ``main``), ``models/models.py::AVClassifier.forward(mode)``,
``datasets/dataloader.py``, ``scripts/run_train.sh``.

Model: encoders, the config's fused classifier (concat by default) and separate unimodal heads
``h_m`` (switched on in :meth:`Remix.configure_model`).

* Warm-up, ``epoch < warmup_epochs`` (10): ``L = CE(fused) + warmup_weight * sum_m CE(h_m)``
  (the code's alpha = beta = 0.5).
* Each later epoch, before training (``on_epoch_start``): an eval-mode pass over the training
  split with eval transforms (``ctx.train_eval_batches()``), ``KL_m,i = sum_k p log2(p K)`` of head
  m's softmax (clipped to [1e-9, 1]) against the uniform distribution; sample i is assigned to
  the modality it is LEAST confident on, ``argmin_m KL_m,i`` (ties: the later modality, as the
  code's ``KL_a < KL_v``).
* Training (``sampler``): each subset shuffled, the subsets one after the other -- for
  (audio, visual) first the video-assigned samples, then the audio-assigned ones, as the code;
  each sample once per epoch. ``compute_loss`` looks up each row's assignment by
  ``batch.index`` and zeroes the OTHER modalities' features of that row after the encoders:
  ``L = mean_i [CE(fused_i) + remix_weight * CE(h_{a_i}(z_{a_i,i}))]`` (gamma1 = gamma2 = 1).
  No gradient reaches a zeroed modality's encoder from that row.

Defaults (``run_train.sh``: Adam lr 5e-5, wd 1e-4, bs 64, 60 epochs, StepLR(30, 0.1), seed 42
on CREMA-D) belong to the config; the method's are warmup 10, weights 0.5 / 1.

Decisions and deviations:

* K is the dataset's number of classes (the code hard-codes 6, CREMA-D's).
* A batch that straddles two subsets (the code's batches are always modality-pure) is handled per
  row; the loss is the row mean, which for a pure batch is exactly the code's ``L_av + gamma L_m``.
  ``order="interleave"`` shuffles all samples together (mixed batches by design).
* One weight per phase for every modality (``warmup_weight`` = the code's alpha = beta,
  ``remix_weight`` = gamma1 = gamma2); the code's values are equal anyway.
* M > 2 (extension): argmin over the M KLs, every other modality zeroed; subsets ordered from the
  last modality to the first.
* Processes: each process scores its shard of the training split; the per-index one-hot
  assignments are summed over processes (``scatter_by_index``) so every replica holds the same
  table and the same epoch order (the trainer then shards it). An index seen by no process (not
  expected) stays ``-1``: all modalities kept, fused loss only, placed last.
* The assignment is made with the model in eval mode (restored afterwards), as the code.
* Logs: ``share_{m}`` (fraction of the training set assigned to m, epoch-end) and per batch
  ``loss_fused``, ``loss_uni``. State: ``assign`` (a long tensor over the training indices, or None).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.remix import assign_modalities, keep_rows, kl_to_uniform, remix_order
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method

ORDERS = ("subsets", "interleave")


@dataclass
class RemixOptions:
    warmup_epochs: int = 10
    warmup_weight: float = 0.5  # the code's alpha = beta: unimodal-head CE weight during warm-up
    remix_weight: float = 1.0  # the code's gamma1 = gamma2: the kept modality's head CE weight
    order: str = "subsets"  # subsets (the code) | interleave

    def validate(self):
        errs = []
        if self.warmup_epochs < 0:
            errs.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_weight < 0:
            errs.append(f"warmup_weight must be >= 0, got {self.warmup_weight}")
        if self.remix_weight < 0:
            errs.append(f"remix_weight must be >= 0, got {self.remix_weight}")
        if self.order not in ORDERS:
            errs.append(f"order must be one of {', '.join(ORDERS)}, got '{self.order}'")
        return errs


@register_method("remix", paper="Ma et al., ICML 2025", kind="data",
                 description="Data Remixing: after warm-up, each sample is trained each epoch on the modality "
                             "it is least confident on (others zeroed), in modality-pure batches")
class Remix(Method):
    Options = RemixOptions
    modality_range = (2, None)
    state_attrs = ("assign",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.assign: Optional[Tensor] = None  # [N] long, index of the kept modality (-1: none)
        self._epoch = 0

    def configure_model(self, model_cfg):
        model_cfg.unimodal_heads = True

    def remixing(self, epoch: int) -> bool:
        return epoch >= self.options.warmup_epochs

    # ------------------------------------------------------------------------------ assignment
    @torch.no_grad()
    def compute_assignment(self, model, batches, size: int) -> Tensor:
        """The per-index assignment from an eval-mode pass over ``batches`` (global over processes)."""
        was = model.training
        model.eval()
        idx_all, onehot_all = [], []
        try:
            for batch in batches:
                feats = model.encode(batch.inputs)
                heads = model.head_logits(feats)
                kl = torch.stack([kl_to_uniform(heads[m], self.num_classes) for m in self.modalities], 1)
                a = assign_modalities(kl)
                idx_all.append(batch.index.to(a.device))
                onehot_all.append(F.one_hot(a, len(self.modalities)).float())
        finally:
            model.train(was)
        if idx_all:
            idx, onehot = torch.cat(idx_all), torch.cat(onehot_all)
            size = max(size, int(idx.max()) + 1)
        else:
            dev = next(model.parameters()).device
            idx, onehot = torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, len(self.modalities), device=dev)
        table = D.scatter_by_index(onehot, idx, size)
        assign = table.argmax(1)
        assign[table.sum(1) == 0] = -1
        return assign.cpu()

    # ------------------------------------------------------------------------------ hooks
    def on_epoch_start(self, model, ctx):
        self._epoch = ctx.epoch
        if not self.remixing(ctx.epoch):
            return
        if model.heads is None:
            raise MethodSetupError("method 'remix' needs unimodal heads (build the model with mmbalance.prepare_model)")
        self.assign = self.compute_assignment(model, ctx.train_eval_batches(), int(ctx.train_size or 0))

    def sampler(self, dataset_size, epoch, generator):
        if not self.remixing(epoch) or self.assign is None or self.assign.numel() != dataset_size:
            return None
        return remix_order(self.assign, len(self.modalities), generator, self.options.order)

    def compute_loss(self, model, batch, ctx):
        o = self.options
        y = batch.labels
        if not self.remixing(ctx.epoch) or self.assign is None:
            out = model(batch.inputs)
            fused = F.cross_entropy(out.logits, y)
            uni = sum(F.cross_entropy(h, y) for h in out.unimodal_logits.values())
            loss = fused + o.warmup_weight * uni
            return LossOutput(loss, out, {"loss_fused": fused.detach(), "loss_uni": uni.detach()})
        feats = model.encode(batch.inputs)
        idx = batch.index.to(self.assign.device)
        keep = torch.full_like(idx, -1)
        inside = idx < self.assign.numel()
        keep[inside] = self.assign[idx[inside]]
        keep = keep.to(y.device)
        kept = keep_rows(feats, keep, self.modalities)
        logits = model.fuse(kept)
        fused_rows = F.cross_entropy(logits, y, reduction="none")
        heads = model.head_logits(feats)
        uni_rows = torch.zeros_like(fused_rows)
        for j, m in enumerate(self.modalities):
            # every head stays in the graph (zero gradient where not kept): under DDP a head that
            # is computed but unused by the loss would stall the gradient reduction
            ce = F.cross_entropy(heads[m], y, reduction="none")
            uni_rows = uni_rows + torch.where(keep == j, ce, torch.zeros_like(ce))
        loss = (fused_rows + o.remix_weight * uni_rows).mean()
        logs = {"loss_fused": fused_rows.detach().mean(), "loss_uni": uni_rows.detach().mean()}
        return LossOutput(loss, ModelOutput(logits, feats, heads), logs)

    def on_epoch_end(self, model, ctx):
        if not self.remixing(ctx.epoch) or self.assign is None:
            return None
        n = max(int(self.assign.numel()), 1)
        return {f"share_{m}": float((self.assign == j).sum()) / n for j, m in enumerate(self.modalities)}
