"""MMCosine: a multimodal cosine classifier head.

Paper: Xu, Feng, Zhang, Hu, "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual
Fine-Grained Learning", ICASSP 2023 (arXiv 2303.05338). Code followed:
GeWu-Lab/MMCosine_ICASSP23@00ba0a9 (``main_CD.py::train_epoch/valid/main``,
``models/basic_model.py``, ``models/fusion_modules.py``); spec ``baselines.md`` §4.15.

Computation: the concat classifier ``Linear(sum d_m, K)`` is split into per-modality blocks
``W_m`` [K, d_m]; each modality contributes
``l_m = s * normalize(z_m) @ normalize(W_m)^T`` (cosine between the feature and every class
row, times the scaling ``s``), the fused logits are ``sum_m l_m`` with **no bias**, and the loss is
the plain cross-entropy of the fused logits. The head is installed through ``build_fusion``
(:class:`CosineFusion`); its ``modality_logits`` are the ``l_m`` (they sum to the fused logits,
and zeroing a modality's features removes exactly its term, so ``zero_out`` accuracies are the
per-modality cosine predictions, as the code's unimodal accuracies).

Options: ``scaling`` (default 10: the code's default and its README example; the peer uses 15),
``eval_head``, ``head`` (below). No per-dataset presets (every run line uses s = 10).

Decisions and deviations (spec §4.15):

* **Evaluation head (code bug).** The released ``valid()`` predicts the fused class with the
  model's *plain* ``fc_out(cat(z))`` output -- unnormalised and with the bias that training never
  uses -- and only the unimodal accuracies with the cosine logits. DECISION: predict with the
  cosine logits (``eval_head="cosine"``, default; the paper's model). ``eval_head="linear"``
  reproduces the code's mismatched prediction ``cat(z) @ W^T`` (our head has no bias; the
  code's bias is never trained, so it stays at its initial value -- 0 under its xavier/zero
  init). Numbers reported with the released code were computed with that mismatched head.
* Fusions: the cosine head replaces ``concat`` (the code's case), and also ``sum``/``late``
  (identical maths: per-modality blocks, no bias). The code's FiLM/gated variants normalise the
  *fusion outputs* instead of the encoder features; they are not implemented here and
  ``model.fusion=film|gated`` is refused at set-up.
* The optional NCE term of the code (``lambda * NCE``, lambda = 0 in every run) is not
  implemented.
* ``head="fusion"`` keeps the configured fusion and plain cross-entropy (the method then is
  joint training) -- the no-op configuration used by the tests.
* M > 2: sum of the per-modality cosine terms (natural; the code has two modalities).
* No batch statistic, no state; nothing to reduce across processes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MethodSetupError
from ..functional.mmcosine import cosine_logits
from ..models.fusion import ConcatFusion
from ..models.multimodal import ModelOutput
from ..models.resnet import ogm_init
from .base import Method, register_method


class CosineFusion(ConcatFusion):
    """``sum_m s * cos(z_m, W_m[k])`` with the concat weight ``W`` [K, sum d_m] split per modality
    (``ConcatFusion.weight_blocks``); no bias."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, scale: float = 10.0, eps: float = 1e-12):
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(self.dims.values()), num_classes, bias=False)
        self.scale = float(scale)
        self.eps = float(eps)

    def modality_logits(self, features):
        w = self.weight_blocks()
        return {m: cosine_logits(features[m], w[m], self.scale, self.eps) for m in self.modalities}

    def forward(self, features):
        return torch.stack(list(self.modality_logits(features).values())).sum(0)

    def linear_logits(self, features) -> Tensor:
        """The released code's evaluation output: ``cat(z) @ W^T`` (unnormalised)."""
        return self.fc(torch.cat([features[m] for m in self.modalities], dim=1))


@dataclass
class MMCosineOptions:
    scaling: float = 10.0  # s
    eval_head: str = "cosine"  # cosine (paper; DECISION) | linear (the released valid(): plain fc_out)
    head: str = "cosine"  # cosine | fusion (keep the configured fusion: plain joint training)
    eps: float = 1e-12  # of the normalisations

    def validate(self):
        errs = []
        if not self.scaling > 0:
            errs.append(f"scaling must be > 0, got {self.scaling}")
        if self.eval_head not in ("cosine", "linear"):
            errs.append(f"eval_head must be 'cosine' or 'linear', got '{self.eval_head}'")
        if self.head not in ("cosine", "fusion"):
            errs.append(f"head must be 'cosine' or 'fusion', got '{self.head}'")
        if self.eps <= 0:
            errs.append(f"eps must be > 0, got {self.eps}")
        return errs


@register_method("mmcosine", paper="Xu et al., ICASSP 2023 (MMCosine)", kind="objective",
                 description="cosine classifier head: sum of scaled per-modality cosine logits, no bias")
class MMCosine(Method):
    Options = MMCosineOptions

    def build_fusion(self, dims, num_classes, model_cfg):
        o = self.options
        if o.head == "fusion":
            return None
        fusion = getattr(model_cfg, "fusion", "concat")
        if fusion not in ("concat", "sum", "late"):
            raise MethodSetupError(f"method 'mmcosine' replaces a concat/sum/late classifier by its cosine head; "
                                   f"model.fusion={fusion} (the code's FiLM/gated cosine variants) is not implemented. "
                                   f"Use model.fusion=concat")
        head = CosineFusion(dims, num_classes, o.scaling, o.eps)
        ogm_init(head)
        return head

    def predict(self, model, batch):
        if self.options.eval_head == "cosine" or not isinstance(model.fusion, CosineFusion):
            return model(batch.inputs)
        feats = model.encode(batch.inputs)
        return ModelOutput(model.fusion.linear_logits(feats), feats, model.head_logits(feats))
