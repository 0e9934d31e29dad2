"""LFM: "Facilitating Multimodal Classification via Dynamically Learning Modality Gap".

Paper: Yang Yang, Fengqiang Wan, Qing-Yuan Jiang, Yi Xu, NeurIPS 2024 ("LFM" is only the
repository's name, njustkmg/NeurIPS24-LFM; no expansion of the acronym is given). Code read (spec
``baselines.md`` §4.13): njustkmg/NeurIPS24-LFM@ad44fa0 -- ``Crema_epoch.py`` (heuristic schedule),
``Crema_epoch_learnable.py`` (learnable alpha, not implemented yet), ``model/AudioVideo.py``,
``data/crema.json``.

Model (code): encoders -> one linear classifier per modality (``cls_a``, ``cls_v``) and **no fused
head**; the prediction is ``0.5 o_a + 0.5 o_v``. Here: the method's own fusion is the library's
``late`` fusion (one ``Linear(d_m, K)`` branch per modality, fused = mean of the branch logits;
Xavier init as ``weight_init``), so ``o_m = model.modality_logits(features)[m]``. A config with
``model.fusion=late`` keeps the model's own late fusion; any other fusion is replaced.

Loss, per batch::

    L_cls   = CE(mean_m o_m, y)
    L_align = JS(softmax(o_a), softmax(o_v))          # batchmean, natural log; M > 2: mean over pairs
    L       = scale * (alpha1 L_cls + alpha2 L_align),  alpha2 = 1 - alpha1, scale = 2 (code)

alpha1 per epoch (``on_epoch_start``):

* ``mode=heuristic`` (default; the code's ``getAlpha_Learnable_Fitted``): a quintic fitted on a
  200-epoch run, ``alpha1(0) = 0.2046`` rising to ~0.92 at epoch 199.
* ``mode=fixed``: ``alpha1`` from the options for every epoch (ablations; ``alpha1=1, scale=1``
  is plain cross-entropy on the late fusion).
* ``mode=learnable`` (bi-level, HVP on held-out samples) is not implemented yet; the option name
  is reserved for it.

Decisions and deviations:

* DECISION (spec): the second term is the code's JS divergence between the modalities'
  predictions, not the "contrastive" term of the abstract.
* DECISION (spec): the quintic is a 200-epoch fit that diverges after epoch 200 (alpha1(250) =
  -2.31); the epoch is rescaled to the run length, ``e' = e * 200 / train.epochs``
  (``rescale=false``: the raw epoch), and alpha1 clamped to [0, 1].
* M > 2: mean pairwise JS over modality pairs (as the peer); fused = mean of the branch logits.
* Per-modality evaluation (``zero_out_logits``): each modality's own classifier ``o_m`` (with the
  late fusion, zeroing the other features would add their biases).
* Defaults of the code's CREMA-D config (SGD lr 1e-2, momentum 0.9, wd 1e-4, bs 64, 200 epochs,
  StepLR(70, 0.1)) are the optimiser/schedule's business, not this method's options.
* Logs: ``alpha_cls`` / ``alpha_align`` (the schedule), ``loss_cls`` / ``loss_align`` per batch.
  State: ``alpha1`` (a float).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..errors import MethodSetupError
from ..functional.lfm import heuristic_alpha1, lfm_loss, mean_pairwise_js
from ..models.fusion import LateFusion
from ..models.multimodal import ModelOutput
from .base import LossOutput, Method, register_method

LFM_MODES = ("heuristic", "fixed")


@dataclass
class LFMOptions:
    mode: str = "heuristic"  # heuristic | fixed  (learnable: later)
    alpha1: float = 0.5  # weight of L_cls with mode=fixed (alpha2 = 1 - alpha1)
    rescale: bool = True  # heuristic: e' = epoch * 200 / train.epochs (false: the raw epoch)
    scale: float = 2.0  # the code's overall factor 2

    def validate(self):
        errs = []
        if self.mode == "learnable":
            errs.append("mode 'learnable' (the bi-level alpha of Crema_epoch_learnable.py) is not implemented yet; "
                        "use heuristic or fixed")
        elif self.mode not in LFM_MODES:
            errs.append(f"mode must be one of {', '.join(LFM_MODES)}, got '{self.mode}'")
        if not 0.0 <= self.alpha1 <= 1.0:
            errs.append(f"alpha1 must be in [0, 1] (alpha2 = 1 - alpha1), got {self.alpha1}")
        if self.scale < 0:
            errs.append(f"scale must be >= 0, got {self.scale}")
        return errs


@register_method("lfm", paper="Yang et al., NeurIPS 2024", kind="objective",
                 description="LFM: per-modality classifiers averaged; CE + JS alignment of the modalities' "
                             "predictions with a scheduled trade-off alpha")
class LFM(Method):
    Options = LFMOptions
    modality_range = (2, None)
    state_attrs = ("alpha1",)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        self.alpha1: float = self.schedule(0, 1)

    # ------------------------------------------------------------------------------ set-up
    def build_fusion(self, dims, num_classes, model_cfg):
        if getattr(model_cfg, "fusion", None) == "late":
            return None  # the config already builds the per-modality classifiers
        from ..models.resnet import ogm_init
        fusion = LateFusion(dims, num_classes)
        ogm_init(fusion)
        return fusion

    def schedule(self, epoch: int, num_epochs: int) -> float:
        o = self.options
        if o.mode == "fixed":
            return float(o.alpha1)
        return heuristic_alpha1(epoch, num_epochs, o.rescale)

    # ------------------------------------------------------------------------------ hooks
    def on_epoch_start(self, model, ctx):
        self.alpha1 = self.schedule(ctx.epoch, ctx.num_epochs)

    @staticmethod
    def _check(model):
        if not isinstance(model.fusion, LateFusion):
            raise MethodSetupError(f"method 'lfm' needs per-modality classifiers (its late fusion); the model has "
                                   f"{type(model.fusion).__name__} (build it with mmbalance.prepare_model)")

    def compute_loss(self, model, batch, ctx):
        self._check(model)
        feats = model.encode(batch.inputs)
        branch = model.modality_logits(feats)
        fused = model.fuse(feats)  # mean of the branch logits
        l_cls = F.cross_entropy(fused, batch.labels)
        l_align = mean_pairwise_js({m: branch[m] for m in self.modalities})
        loss = lfm_loss(l_cls, l_align, self.alpha1, self.options.scale)
        logs = {"loss_cls": l_cls.detach(), "loss_align": l_align.detach(),
                "alpha_cls": self.alpha1, "alpha_align": 1.0 - self.alpha1}
        return LossOutput(loss, ModelOutput(fused, feats, branch), logs)

    def predict(self, model, batch):
        feats = model.encode(batch.inputs)
        return ModelOutput(model.fuse(feats), feats, model.modality_logits(feats))

    def zero_out_logits(self, model, output):
        return model.modality_logits(output.features)
