"""Encoder stages and models that fuse between them (mid-level fusion; spec baselines §2 gap F).

An encoder that can be split exposes

* ``stages() -> [(name, module), ...]``: applied in order, the modules compute the encoder's
  ``forward`` exactly (they are the encoder's own modules, wrapped, never copies; tested
  bit-for-bit in ``tests/test_stages.py``);
* ``stage_channels() -> {name: C}``: the stages after which a cross-modal block may go, with the
  size of the channel axis of their output (``[B, C, h, w]`` maps, ``[B, C]`` vectors);
* ``stage_channel_dim`` (default 1): where that axis is (2 for frames, ``[B, T, C, h, w]``).

=====================  ==============================================  =========================
encoder                stages                                          couplable (channels)
=====================  ==============================================  =========================
ResNet-18              stem, layer1..layer4, pool                      layer1..4 (64..512)
SmallCNN (``cnn``)     block1..block3, pool (avg pool + linear)        block1..3 (32, 64, 128)
MLP                    hidden, out                                     hidden, out (widths)
frames (``[T,C,H,W]``)  the frame encoder's stages per frame, frame_mean  the frame encoder's
transformer, gru,      encode (a trivial split: the whole encoder)    encode (out_dim)
text, hf
=====================  ==============================================  =========================

A method builds a :class:`StagedMultimodalModel` in :meth:`Method.rebuild_model
<mmbalance.methods.base.Method.rebuild_model>`: the same encoders, fusion and heads (same
parameters, same state-dict keys) plus ``cross`` blocks, each run after one named stage of every
modality's encoder; a block maps ``{modality: tensor}`` to ``{modality: tensor}``. It is a
:class:`MultimodalModel` in every other respect (``encode`` gives pooled features, ``fuse``,
``modality_logits``, ``zero_out_logits``, heads, ``subset_logits``), so the trainer, evaluation,
checkpoints and diagnostics work unchanged. Feature-level probes (zero-out, Shapley at
``level="feature"``) act on the pooled features *after* the cross-modal flow.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..errors import ModelSetupError
from .multimodal import MultimodalModel

_HOW = ("give it `stages() -> [(name, module), ...]` (applied in order they must compute its forward) and "
        "`stage_channels() -> {stage name: channels}`; the library's encoders (mlp, cnn, resnet18, transformer, "
        "gru, text, hf, frames) have them")


def encoder_stages(encoder: nn.Module, modality: str = "?", needed_by: str = "mid-level fusion") -> List[Tuple[str, nn.Module]]:
    """The ``(name, module)`` stages of ``encoder``; :class:`ModelSetupError` if it has none."""
    fn = getattr(encoder, "stages", None)
    if not callable(fn):
        raise ModelSetupError(f"{needed_by} needs encoder stages, but the encoder of modality '{modality}' "
                              f"({type(encoder).__name__}) does not expose them: {_HOW}")
    stages = list(fn())
    names = [n for n, _ in stages]
    if not stages or len(set(names)) != len(names) or not all(isinstance(s, nn.Module) for _, s in stages):
        raise ModelSetupError(f"encoder '{modality}' ({type(encoder).__name__}): stages() must return a non-empty "
                              f"list of (unique name, nn.Module) pairs, got {names}")
    return stages


def stage_channels(encoder: nn.Module, modality: str = "?", needed_by: str = "mid-level fusion") -> Dict[str, int]:
    """``{stage: channels}`` of the stages after which a cross-modal block may go (in order)."""
    names = [n for n, _ in encoder_stages(encoder, modality, needed_by)]
    fn = getattr(encoder, "stage_channels", None)
    if not callable(fn):
        raise ModelSetupError(f"{needed_by} needs the channel sizes of the stages of encoder '{modality}' "
                              f"({type(encoder).__name__}): {_HOW}")
    ch = {str(k): int(v) for k, v in dict(fn()).items()}
    bad = [k for k in ch if k not in names]
    if bad:
        raise ModelSetupError(f"encoder '{modality}': stage_channels() names {bad}, which are not among its stages {names}")
    return {n: ch[n] for n in names if n in ch}


def stage_channel_dim(encoder: nn.Module) -> int:
    """The channel axis of the encoder's stage outputs (1 unless the encoder says otherwise)."""
    return int(getattr(encoder, "stage_channel_dim", 1))


def run_stages(stages: Sequence[Tuple[str, nn.Module]], x: Tensor) -> Tensor:
    """Apply the stages in order (equals the encoder's forward)."""
    for _, stage in stages:
        x = stage(x)
    return x


class StagedMultimodalModel(MultimodalModel):
    """``base``'s encoders, fusion, heads (and extras), with cross-modal ``blocks`` run between
    encoder stages. ``points[i]`` = ``{modality: stage name}``: block ``i`` runs once every
    encoder has finished that stage, on ``{modality: tensor}``, and returns the tensors the
    encoders continue from. Points must follow the stage order of every encoder."""

    encoders_exchange = True

    def __init__(self, base: MultimodalModel, points: Sequence[Mapping[str, str]], blocks: Sequence[nn.Module],
                 needed_by: str = "mid-level fusion"):
        if not isinstance(base, MultimodalModel):
            raise ModelSetupError(f"{needed_by} needs a MultimodalModel, got {type(base).__name__}")
        if len(points) != len(blocks):
            raise ModelSetupError(f"{len(points)} fusion points but {len(blocks)} blocks")
        super().__init__(dict(base.encoders), base.fusion, base.num_classes, heads=False,
                         feature_dims=dict(base.feature_dims))
        self.modalities = list(base.modalities)
        self.heads = base.heads
        if hasattr(base, "extras"):
            self.extras = base.extras
        self.needed_by = needed_by
        order = {m: [n for n, _ in encoder_stages(self.encoders[m], m, needed_by)] for m in self.modalities}
        last = {m: -1 for m in self.modalities}
        self.points: List[Dict[str, str]] = []
        for i, p in enumerate(points):
            p = {str(m): str(s) for m, s in p.items()}
            if set(p) != set(self.modalities):
                raise ModelSetupError(f"fusion point {i} names modalities {sorted(p)}; the model has {self.modalities}")
            for m, s in p.items():
                if s not in order[m]:
                    raise ModelSetupError(f"fusion point {i}: encoder '{m}' has no stage '{s}' (its stages: "
                                          f"{', '.join(order[m])})")
                k = order[m].index(s)
                if k <= last[m]:
                    raise ModelSetupError(f"fusion point {i}: stage '{s}' of encoder '{m}' does not come after the "
                                          f"previous point's; points must follow the stage order {order[m]}")
                last[m] = k
            self.points.append(p)
        self.cross = nn.ModuleList(blocks)

    def encode(self, inputs: Mapping[str, Tensor], modalities: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """Pooled features. Every modality's input is needed (the encoders exchange information
        between stages); ``modalities`` only selects which features are returned."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"this model fuses between encoder stages ({self.needed_by}), so every modality's input "
                           f"is needed; missing {missing}")
        stages = {m: encoder_stages(self.encoders[m], m, self.needed_by) for m in self.modalities}
        x = {m: inputs[m] for m in self.modalities}
        pos = {m: 0 for m in self.modalities}
        for point, block in zip(self.points, self.cross):
            for m in self.modalities:
                while True:
                    name, stage = stages[m][pos[m]]
                    x[m] = stage(x[m])
                    pos[m] += 1
                    if name == point[m]:
                        break
            out = block(x)
            x = {m: out[m] for m in self.modalities}
        for m in self.modalities:
            x[m] = run_stages(stages[m][pos[m]:], x[m])
        mods = self.modalities if modalities is None else list(modalities)
        return {m: x[m] for m in mods}
