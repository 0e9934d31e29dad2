"""The multimodal model: one encoder per modality, a fusion module, optional unimodal heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional

from torch import Tensor, nn

from .fusion import Fusion, zero_out


@dataclass
class ModelOutput:
    """What ``MultimodalModel.forward`` returns; nothing is stored on the module."""

    logits: Tensor  # fused logits [B, K]
    features: Dict[str, Tensor]  # per-modality encoder features [B, d_m]
    unimodal_logits: Dict[str, Tensor] = field(default_factory=dict)  # unimodal heads (if any)


class MultimodalModel(nn.Module):
    def __init__(self, encoders: Mapping[str, nn.Module], fusion: Fusion, num_classes: int,
                 heads: bool = False):
        super().__init__()
        self.modalities: List[str] = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.num_classes = num_classes
        self.feature_dims = {m: int(e.out_dim) for m, e in encoders.items()}
        self.heads: Optional[nn.ModuleDict] = None
        if heads:
            self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.feature_dims.items()})

    # -------------------------------------------------------------------------------- pieces
    def encode(self, inputs: Mapping[str, Tensor], modalities: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        mods = self.modalities if modalities is None else list(modalities)
        return {m: self.encoders[m](inputs[m]) for m in mods}

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """Fused logits from (possibly mixed, permuted or zeroed) features."""
        return self.fusion(features)

    def modality_logits(self, features: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The fusion's own per-modality logits (W-split for concat, branches for sum/late,
        zero-out for FiLM/gated)."""
        return self.fusion.modality_logits(features)

    def zero_out_logits(self, features: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Fused logits with all modalities but one replaced by zeros, for every modality."""
        return {m: self.fusion(zero_out(features, m)) for m in self.modalities}

    def head_logits(self, features: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        if self.heads is None:
            return {}
        return {m: self.heads[m](features[m]) for m in features if m in self.heads}

    def forward(self, inputs: Mapping[str, Tensor]) -> ModelOutput:
        features = self.encode(inputs)
        return ModelOutput(self.fuse(features), features, self.head_logits(features))

    # ---------------------------------------------------------------------------- parameters
    def encoder_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        return self.encoders[modality].parameters()

    def head_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        return iter(()) if self.heads is None else self.heads[modality].parameters()

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        return self.fusion.parameters()
