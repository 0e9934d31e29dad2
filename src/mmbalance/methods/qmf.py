"""QMF: Quality-aware Multimodal Fusion ("Provable Dynamic Fusion for Low-Quality Multimodal Data").

Paper: Qingyang Zhang, Haitao Wu, et al., ICML 2023. Code read (spec ``baselines.md`` §4.18):
QingyangZhang/QMF@fe6c4c6 -- ``RGBD-scene-recognition/models/QMF.py::QMF.forward``,
``RGBD-scene-recognition/train_QMF_nyud2.py`` (``rank_loss``, ``model_forward_train``, argparse),
``RGBD-scene-recognition/utils/crl_utils.py::History``.

Model: one linear classifier per modality, ``l_m = head_m(z_m)``, held by the method's own fusion
(:class:`QMFFusion`, Xavier init): ``w_m = 0.1 * logsumexp(l_m)`` per sample (= -0.1 * energy; NOT
detached) and ``fused = sum_m w_m * l_m``. Per-modality logits (``modality_logits``,
``zero_out_logits``) are the classifiers ``l_m``.

Loss, per batch::

    L = sum_m CE(l_m, y) + CE(fused, y) + lam * sum_m RankLoss_m
    RankLoss_m over the pairs (i, j = roll(i, -1)) of the batch:
        h = modality m's per-sample CUMULATIVE cross-entropy (history over all epochs so far),
            min-max normalised over the whole history (every training sample)
        t = sign(h_i - h_j)                          # 1: row i is the less reliable one
        loss_ij = max(0, t (w_i - w_j) - |h_i - h_j|)   # margin="slack" (the code); 0 when t = 0
        RankLoss = mean over the B pairs

The history is updated AFTER the loss, with this batch's detached per-sample CE of each head
(``after_step``). Defaults: lam 0.1 (NYUD2), the weight scale 0.1 of the code.

Decisions and deviations:

* DECISION (spec): the ranking comes from CRL (Moon et al. 2020), where the history is
  correctness and the margin enforces ``conf_reliable >= conf_unreliable + |Delta|``. QMF stores
  *losses* and flips the target but not the margin, so ``|Delta h|`` acts as a slack, not a margin.
  We reproduce the code (``margin="slack"``); ``margin="crl"`` gives CRL's intent,
  ``max(0, w_less - w_more + |Delta h|)``. A suspected bug in the authors' code.
* M > 2: the sums over modalities extend as written.
* The history is a ``[M, N]`` float32 tensor (N = the training split's size; it grows when an
  index beyond it appears, e.g. in a loop without ``train_size``), never reset; rows never seen
  stay 0 and take part in the min-max normalisation (as the code's zero-initialised array).
  A constant history (the first step) normalises to zeros, i.e. no ranking loss.
* Processes: every process's per-sample losses and indices are gathered
  (``all_gather_cat``) before the history is updated, so all replicas keep the same history;
  the pairs are formed within each process's batch (the code's single-process batch).
* The code's training set-up (Adam 1e-4, wd 1e-5, bs 256 with gradient accumulation 3,
  ReduceLROnPlateau, pretrained ResNet-18s) is the config's business, not an option here.
* Logs: ``loss_fused``, ``loss_{m}``, ``rank_{m}`` and ``weight_{m}`` (mean w_m) per batch.
  State: ``history`` (a tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..errors import MethodSetupError
from ..functional.qmf import minmax_normalise, qmf_fuse, rank_loss
from ..models.fusion import Fusion
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method

MARGINS = ("slack", "crl")


class QMFFusion(Fusion):
    """Per-modality linear classifiers fused by their energy-based confidences."""

    def __init__(self, dims, num_classes, hidden=128, scale: float = 0.1):
        super().__init__(dims, num_classes, hidden)
        self.scale = float(scale)
        self.branches = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.dims.items()})

    def modality_logits(self, features):
        return {m: self.branches[m](features[m]) for m in self.modalities}

    def fuse_with_weights(self, features):
        logits = self.modality_logits(features)
        fused, weights = qmf_fuse(logits, self.scale)
        return fused, logits, weights

    def forward(self, features):
        return self.fuse_with_weights(features)[0]


@dataclass
class QMFOptions:
    lam: float = 0.1  # weight of the summed ranking losses
    margin: str = "slack"  # slack (the code) | crl
    weight_scale: float = 0.1  # w_m = weight_scale * logsumexp(l_m)

    def validate(self):
        errs = []
        if self.lam < 0:
            errs.append(f"lam must be >= 0, got {self.lam}")
        if self.margin not in MARGINS:
            errs.append(f"margin must be one of {', '.join(MARGINS)}, got '{self.margin}'")
        if self.weight_scale <= 0:
            errs.append(f"weight_scale must be > 0, got {self.weight_scale}")
        return errs


@register_method("qmf", paper="Zhang et al., ICML 2023", kind="feed-forward",
                 description="QMF: late fusion weighted by per-sample energy confidences, trained with a "
                             "ranking loss against each sample's cumulative unimodal loss")
class QMF(Method):
    Options = QMFOptions
    modality_range = (2, None)
    state_attrs = ("history",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.history: Optional[Tensor] = None  # [M, N] cumulative per-sample CE of each head
        self._pending = None

    def build_fusion(self, dims, num_classes, model_cfg):
        from ..models.resnet import ogm_init
        fusion = QMFFusion(dims, num_classes, scale=self.options.weight_scale)
        ogm_init(fusion)
        return fusion

    # ------------------------------------------------------------------------------ history
    def _history(self, size: int, device) -> Tensor:
        h = self.history
        if h is None:
            h = torch.zeros(len(self.modalities), size)
        if h.shape[1] < size:
            h = torch.cat([h, h.new_zeros(h.shape[0], size - h.shape[1])], dim=1)
        self.history = h.to(device=device, dtype=torch.float32)
        return self.history

    @staticmethod
    def _fusion(model) -> QMFFusion:
        if not isinstance(model.fusion, QMFFusion):
            raise MethodSetupError(f"method 'qmf' needs its own fusion (QMFFusion); the model has "
                                   f"{type(model.fusion).__name__} (build it with mmbalance.prepare_model)")
        return model.fusion

    # ------------------------------------------------------------------------------ hooks
    def compute_loss(self, model, batch, ctx):
        o = self.options
        fusion = self._fusion(model)
        feats = model.encode(batch.inputs)
        fused, logits, weights = fusion.fuse_with_weights(feats)
        y = batch.labels
        ce_rows = {m: F.cross_entropy(logits[m], y, reduction="none") for m in self.modalities}
        uni = {m: v.mean() for m, v in ce_rows.items()}
        l_fused = F.cross_entropy(fused, y)
        loss = l_fused + sum(uni.values())
        size = max(int(ctx.train_size or 0), int(batch.index.max()) + 1)
        hist = self._history(size, fused.device)
        logs = {"loss_fused": l_fused.detach()}
        idx = batch.index.to(hist.device)
        for i, m in enumerate(self.modalities):
            h = minmax_normalise(hist[i])[idx]
            r = rank_loss(weights[m], h, o.margin)
            if o.lam > 0:
                loss = loss + o.lam * r
            logs[f"loss_{m}"] = uni[m].detach()
            logs[f"rank_{m}"] = r.detach()
            logs[f"weight_{m}"] = weights[m].detach().mean()
        # the history is updated after the step (after_step), with this batch's detached losses
        self._pending = (batch.index.detach(), torch.stack([ce_rows[m].detach().float() for m in self.modalities]))
        return LossOutput(loss, ModelOutput(fused, feats, logits), logs)

    def after_step(self, model, batch, result, ctx):
        if self._pending is None:
            return
        idx, ce = self._pending
        self._pending = None
        idx = D.all_gather_cat(idx.to(ce.device))
        ce = D.all_gather_cat(ce.t().contiguous()).t()  # [M, B_total]
        hist = self._history(max(self.history.shape[1], int(idx.max()) + 1), ce.device)
        hist.index_add_(1, idx, ce)

    def predict(self, model, batch):
        fusion = self._fusion(model)
        feats = model.encode(batch.inputs)
        fused, logits, _ = fusion.fuse_with_weights(feats)
        return ModelOutput(fused, feats, logits)

    def zero_out_logits(self, model, output):
        return model.modality_logits(output.features)

    def state_dict(self):
        return {"history": None if self.history is None else self.history.detach().cpu().clone()}

    def load_state_dict(self, state):
        if "history" not in state:
            raise KeyError("method 'qmf' state lacks ['history']")
        h = state["history"]
        self.history = None if h is None else h.detach().clone().float()
        self._pending = None
