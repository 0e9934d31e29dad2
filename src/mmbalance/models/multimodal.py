"""The multimodal model: one encoder per modality, a fusion module, optional unimodal heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelSetupError

from .fusion import Fusion, zero_out


@dataclass
class ModelOutput:
    """What ``MultimodalModel.forward`` returns; nothing is stored on the module."""

    logits: Tensor  # fused logits [B, K]
    features: Dict[str, Tensor]  # per-modality encoder features [B, d_m]
    unimodal_logits: Dict[str, Tensor] = field(default_factory=dict)  # unimodal heads (if any)
    #: per-modality logits with the other modalities removed, when the model or method had to
    #: compute them with extra forward passes (mid-level fusion: Greedy); empty otherwise, and
    #: ``Method.zero_out_logits`` derives them from ``features``
    zero_out: Dict[str, Tensor] = field(default_factory=dict)


class MultimodalModel(nn.Module):
    """One encoder per modality (``encoders[m]``: a batch tensor ``[B, ...]`` -> ``[B, d_m]``),
    a fusion module (features dict -> logits) and optional unimodal heads.

    Your own encoders: :meth:`from_encoders`. ``feature_dims`` is read from each encoder's
    ``out_dim`` attribute unless given.
    """

    #: whether the encoders exchange information (mid-level fusion: a modality's features then
    #: depend on the other inputs, and removing a modality means removing its input)
    encoders_exchange: bool = False

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: Fusion, num_classes: int,
                 heads: bool = False, feature_dims: Optional[Mapping[str, int]] = None):
        super().__init__()
        self.modalities: List[str] = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.num_classes = int(num_classes)
        if feature_dims is None:
            missing = [m for m, e in encoders.items() if not hasattr(e, "out_dim")]
            if missing:
                raise ModelSetupError(f"encoder(s) {missing} have no 'out_dim' attribute; pass feature_dims="
                                      f"{{modality: d}} or use MultimodalModel.from_encoders")
            feature_dims = {m: e.out_dim for m, e in encoders.items()}
        self.feature_dims = {m: int(feature_dims[m]) for m in self.modalities}
        self.heads: Optional[nn.ModuleDict] = None
        if heads:
            self.add_heads()

    @classmethod
    def from_encoders(cls, encoders: Mapping[str, nn.Module], num_classes: int, fusion: str = "concat", *,
                      dims: Optional[Mapping[str, int]] = None,
                      input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                      heads: bool = False, fusion_hidden: int = 128) -> "MultimodalModel":
        """A model on your own encoders with one of the library's fusions.

        Each encoder maps modality ``m``'s batch tensor to ``[B, d_m]``. ``d_m`` comes from
        ``dims[m]``, else the encoder's ``out_dim`` attribute, else a dry forward on zeros of
        ``input_shapes[m]`` (per-sample shape, e.g. ``data.input_shapes``). Methods that need
        unimodal heads or their own fusion add them when training starts.
        """
        from .fusion import build_fusion
        from .resnet import ogm_init
        if not encoders:
            raise ModelSetupError("from_encoders needs at least one encoder")
        bad = [m for m, e in encoders.items() if not isinstance(e, nn.Module)]
        if bad:
            raise ModelSetupError(f"encoders {bad} are not torch.nn.Module instances")
        feature_dims = {}
        for m, enc in encoders.items():
            if dims is not None and m in dims:
                feature_dims[m] = int(dims[m])
            elif hasattr(enc, "out_dim"):
                feature_dims[m] = int(enc.out_dim)
            elif input_shapes is not None and m in input_shapes:
                feature_dims[m] = infer_feature_dim(enc, input_shapes[m], m)
            else:
                raise ModelSetupError(f"cannot tell the feature size of encoder '{m}': pass dims={{'{m}': d}}, "
                                      f"give the encoder an 'out_dim' attribute, or pass input_shapes "
                                      f"(e.g. input_shapes=data.input_shapes) for a dry forward")
            if feature_dims[m] < 1:
                raise ModelSetupError(f"encoder '{m}': feature size must be >= 1, got {feature_dims[m]}")
        fusion_mod = build_fusion(fusion, feature_dims, int(num_classes), fusion_hidden)
        ogm_init(fusion_mod)
        return cls(dict(encoders), fusion_mod, num_classes, heads=heads, feature_dims=feature_dims)

    def add_heads(self) -> None:
        """Attach one linear unimodal head per modality (idempotent)."""
        if self.heads is not None:
            return
        from .resnet import ogm_init
        device = next((p.device for p in self.parameters()), None)
        self.heads = nn.ModuleDict({m: nn.Linear(d, self.num_classes) for m, d in self.feature_dims.items()})
        ogm_init(self.heads)
        if device is not None:
            self.heads.to(device)

    # -------------------------------------------------------------------------------- pieces
    def encode(self, inputs: Mapping[str, Tensor], modalities: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        mods = self.modalities if modalities is None else list(modalities)
        return {m: self.encoders[m](inputs[m]) for m in mods}

    def encode_alone(self, inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Each modality's features computed from its own input only. The same as :meth:`encode`
        unless the encoders exchange information (then one pass per modality, the other inputs
        set to zeros)."""
        if not self.encoders_exchange:
            return self.encode(inputs)
        out = {}
        for m in self.modalities:
            alone = {k: (x if k == m else torch.zeros_like(x)) for k, x in inputs.items()}
            out[m] = self.encode(alone)[m]
        return out

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

    # ------------------------------------------------------------------- modality subsets
    def subset_logits(self, inputs: Mapping[str, Tensor], subsets: Iterable[Iterable[str]], level: str = "feature",
                      bn: str = "train", features: Optional[Mapping[str, Tensor]] = None) -> Dict[frozenset, Tensor]:
        """Fused logits with only the modalities of each subset kept, the others removed.

        ``level="feature"``: every encoder runs once (or ``features`` are reused) and removed
        modalities' features are replaced by zeros before the fusion -- the ``zero_out`` probe.
        ``level="input"``: removed modalities' *inputs* are replaced by zeros and the encoders
        run again for each subset (AGM's and the peer's Shapley convention); with
        ``bn="eval"`` BatchNorm layers use their running statistics during those passes (and
        are put back in their mode afterwards), so zeroed inputs do not corrupt them.
        Returns ``{frozenset(kept): logits [B, K]}``; the empty subset is allowed.
        """
        subsets = [frozenset(s) for s in subsets]
        unknown = sorted({m for s in subsets for m in s} - set(self.modalities))
        if unknown:
            raise KeyError(f"unknown modalities {unknown}; the model has {self.modalities}")
        if level == "feature":
            feats = dict(features) if features is not None else self.encode(inputs)
            return {s: self.fusion({m: (z if m in s else torch.zeros_like(z)) for m, z in feats.items()})
                    for s in subsets}
        if level != "input":
            raise ValueError(f"level must be 'feature' or 'input', got '{level}'")
        if bn not in ("train", "eval"):
            raise ValueError(f"bn must be 'train' or 'eval', got '{bn}'")
        norms = [mod for mod in self.encoders.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
        modes = [mod.training for mod in norms]
        try:
            if bn == "eval":
                for mod in norms:
                    mod.eval()
            return {s: self.fuse(self.encode({m: (x if m in s else torch.zeros_like(x)) for m, x in inputs.items()}))
                    for s in subsets}
        finally:
            for mod, was in zip(norms, modes):
                mod.train(was)

    def forward_subset(self, inputs: Mapping[str, Tensor], keep: Iterable[str], level: str = "feature",
                       bn: str = "train") -> Tensor:
        """Fused logits with only ``keep`` (see :meth:`subset_logits`)."""
        keep = frozenset(keep)
        return self.subset_logits(inputs, [keep], level=level, bn=bn)[keep]

    # ---------------------------------------------------------------------------- parameters
    def encoder_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        return self.encoders[modality].parameters()

    def head_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        return iter(()) if self.heads is None else self.heads[modality].parameters()

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        return self.fusion.parameters()


@torch.no_grad()
def infer_feature_dim(encoder: nn.Module, shape: Sequence[int], modality: str = "?") -> int:
    """``d`` of an encoder by a dry forward on two zero samples of per-sample ``shape`` (eval mode,
    the encoder's train/eval flag restored)."""
    p = next(encoder.parameters(), None)
    x = torch.zeros((2, *[int(s) for s in shape]), device=p.device if p is not None else "cpu")
    was = encoder.training
    encoder.eval()
    try:
        out = encoder(x)
    except Exception as exc:
        raise ModelSetupError(f"encoder '{modality}' failed on a dry forward with input [2, {', '.join(map(str, shape))}]: "
                              f"{type(exc).__name__}: {exc}") from exc
    finally:
        encoder.train(was)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelSetupError(f"encoder '{modality}' must return a [B, d] tensor; on input [2, "
                              f"{', '.join(map(str, shape))}] it returned {got}")
    return int(out.shape[1])
