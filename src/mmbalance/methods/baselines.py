"""Plain baselines: joint training, unimodal training, an ensemble of unimodal models, and
multi-loss (fused + unimodal-head cross-entropies)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..errors import MethodSetupError
from ..models.multimodal import ModelOutput
from ..registry import suggest
from .base import LossOutput, Method, register_method


@register_method("joint", paper="-", kind="baseline", modalities=">=1",
                 description="joint training of all encoders with one fused cross-entropy")
class Joint(Method):
    modality_range = (1, None)


@dataclass
class UnimodalOptions:
    modality: Optional[str] = None  # default: the dataset's first modality


@register_method("unimodal", paper="-", kind="baseline", modalities=">=1",
                 description="train one modality alone (the others' features are zeros)")
class Unimodal(Method):
    """Trains encoder ``modality`` and the fused classifier with every other modality's features
    replaced by zeros; the other encoders are never run. Its accuracy therefore equals its
    zero-out accuracy on ``modality``."""

    Options = UnimodalOptions
    modality_range = (1, None)

    def __init__(self, options, modalities, num_classes):
        super().__init__(options, modalities, num_classes)
        m = self.options.modality or self.modalities[0]
        if m not in self.modalities:
            raise MethodSetupError(f"method.modality='{m}' is not a modality of this dataset.{suggest(m, self.modalities)} "
                                   f"Modalities: {', '.join(self.modalities)}")
        self.modality = m

    def _output(self, model, batch) -> ModelOutput:
        z = model.encode(batch.inputs, [self.modality])[self.modality]
        feats = {k: (z if k == self.modality else z.new_zeros(z.shape[0], model.feature_dims[k]))
                 for k in model.modalities}
        return ModelOutput(model.fuse(feats), feats, {})

    def compute_loss(self, model, batch, ctx):
        out = self._output(model, batch)
        return LossOutput(F.cross_entropy(out.logits, batch.labels), out)

    def predict(self, model, batch):
        return self._output(model, batch)


@register_method("ensemble", paper="-", kind="baseline", modalities=">=1",
                 description="unimodal models trained independently, probabilities averaged at test time")
class Ensemble(Method):
    """Each encoder is trained only through its own head (the sum of independent losses gives
    each its own gradient), so this is M unimodal models trained side by side. Test-time
    prediction: the mean of the heads' softmax probabilities (returned as log-probabilities).
    Per-modality predictions are each head alone."""

    modality_range = (1, None)

    def configure_model(self, model_cfg):
        model_cfg.unimodal_heads = True

    def compute_loss(self, model, batch, ctx):
        feats = model.encode(batch.inputs)
        heads = model.head_logits(feats)
        losses = {m: F.cross_entropy(h, batch.labels) for m, h in heads.items()}
        loss = sum(losses.values())
        logits = self._average({m: h.detach() for m, h in heads.items()})
        logs = {f"loss_{m}": v.detach() for m, v in losses.items()}  # device tensors, read once per epoch
        return LossOutput(loss, ModelOutput(logits, feats, heads), logs)

    @staticmethod
    def _average(heads: Dict[str, torch.Tensor]) -> torch.Tensor:
        probs = torch.stack([h.softmax(dim=1) for h in heads.values()]).mean(0)
        return probs.clamp_min(1e-12).log()

    def predict(self, model, batch):
        feats = model.encode(batch.inputs)
        heads = model.head_logits(feats)
        return ModelOutput(self._average(heads), feats, heads)

    def zero_out_logits(self, model, output):
        return dict(output.unimodal_logits)


@dataclass
class MultilossOptions:
    unimodal_weight: float = 1.0  # weight of the summed unimodal-head cross-entropies

    def validate(self):
        if self.unimodal_weight < 0:
            return [f"unimodal_weight must be >= 0, got {self.unimodal_weight}"]
        return []


@register_method("multiloss", paper="-", kind="objective", modalities=">=1",
                 description="fused cross-entropy plus the unimodal heads' cross-entropies")
class Multiloss(Method):
    Options = MultilossOptions
    modality_range = (1, None)

    def configure_model(self, model_cfg):
        model_cfg.unimodal_heads = True

    def compute_loss(self, model, batch, ctx):
        out = model(batch.inputs)
        fused = F.cross_entropy(out.logits, batch.labels)
        uni = {m: F.cross_entropy(h, batch.labels) for m, h in out.unimodal_logits.items()}
        loss = fused + self.options.unimodal_weight * sum(uni.values())
        logs = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in uni.items()}}
        return LossOutput(loss, out, logs)
