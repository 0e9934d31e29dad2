"""Encoders, picked from the per-sample input shape.

==================  ===========================================  ==================
per-sample shape    encoder (``model.encoder=auto``)              alternatives
==================  ===========================================  ==================
[D]                 :class:`MLPEncoder`                           -
[T, D], D > 16      :class:`TransformerEncoder`                   ``gru``, ``tcn``
[T, D], D <= 16     :class:`TCNEncoder` (raw signals, e.g. IMU)   ``transformer``, ``gru``
[C, H, W]           :class:`SmallCNN`                             ``resnet18``
[T, C, H, W]        :class:`FrameEncoder` (per-frame CNN, mean)   ``resnet18``
[L] int64 token ids :class:`TextEncoder` (dataset hint ``text:V``)   ``hf:<local folder>``
==================  ===========================================  ==================

Text: a dataset whose modality holds token ids sets the hint ``text:<vocab size>`` (``text`` alone
needs the vocabulary size, so give ``text:V`` when choosing it by hand). ``hf:<local folder>``
loads a Hugging Face model with ``local_files_only=True`` (``transformers`` is imported only then).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .resnet import ResNet18Encoder

class _EncoderNames(tuple):
    """The encoder names; membership also accepts the parametrised kinds ``text:<V>`` and
    ``hf:<local folder>``."""

    def __contains__(self, kind) -> bool:
        if isinstance(kind, str) and (kind.startswith("hf:") or kind.startswith("text:")):
            return True
        return tuple.__contains__(self, kind)


ENCODER_NAMES = _EncoderNames(("auto", "mlp", "transformer", "gru", "tcn", "cnn", "resnet18", "text"))
#: ``model.encoder=auto`` on ``[T, D]`` sequences: a temporal CNN (:class:`TCNEncoder`) for at most
#: this many channels per step (raw signals: IMU, EEG, audio channels), the transformer above it
#: (feature sequences: word vectors, COVAREP, facial features). On a 6-channel, 50-step IMU set the
#: TCN trains ~15x faster than the transformer on CPU, at no loss of accuracy (docs/benchmarks.md)
TCN_MAX_CHANNELS = 16


class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """``hidden`` (linear, ReLU, dropout) and ``out`` (linear, ReLU); composed they are
        :meth:`forward` (see :mod:`mmbalance.models.stages`)."""
        return [("hidden", self.net[0:3]), ("out", self.net[3:5])]

    def stage_channels(self) -> Dict[str, int]:
        """Widths of the vectors ``[B, C]`` after each stage (both may take a cross-modal block)."""
        return {"hidden": self.net[0].out_features, "out": self.out_dim}


class _TransformerCore(nn.Module):
    """Learned positions -> transformer layers (optional padding mask) -> mean over the kept
    positions -> linear to ``out_dim``; shared by the sequence and text encoders."""

    def __init__(self, seq_len: int, hidden: int, out_dim: int, dropout: float = 0.0, layers: int = 2, heads: int = 4):
        super().__init__()
        if hidden % heads:
            heads = 1
        self.pos = nn.Parameter(torch.zeros(1, seq_len, hidden))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, h: Tensor, pad: Optional[Tensor] = None) -> Tensor:
        h = self.encoder(h + self.pos[:, : h.shape[1]], src_key_padding_mask=pad)
        if pad is None:
            return self.proj(h.mean(dim=1))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.proj((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


class TransformerEncoder(nn.Module):
    """[B, T, D] -> linear embedding + learned positions -> 2 transformer layers -> mean over T."""

    def __init__(self, in_dim: int, seq_len: int, hidden: int, out_dim: int, dropout: float = 0.0,
                 layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        self.core = _TransformerCore(seq_len, hidden, out_dim, dropout, layers, heads)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.core(self.embed(x))

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """A trivial split: one stage, ``encode``, the whole encoder (its intermediate tensors are
        sequences, not channel maps); see :mod:`mmbalance.models.stages`."""
        return [("encode", self)]

    def stage_channels(self) -> Dict[str, int]:
        return {"encode": self.out_dim}


class TCNEncoder(nn.Module):
    """[B, T, D] -> three temporal conv blocks over T (Conv1d k=5, 5, 3 with 64, 128, 128 channels,
    BatchNorm, ReLU, max-pool 2 after the first two) -> global average over time -> linear ->
    ReLU. For raw low-dimensional signals (IMU, EEG): ~15x fewer multiply-adds than the
    transformer on a 50-step sequence."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        layers, c = [], in_dim
        for k, (ch, ks) in enumerate(((64, 5), (128, 5), (128, 3))):
            layers += [nn.Conv1d(c, ch, ks, padding=ks // 2, bias=False), nn.BatchNorm1d(ch), nn.ReLU(inplace=True)]
            if k < 2:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            c = ch
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(c, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.transpose(1, 2)).mean(dim=2)
        return torch.relu(self.proj(self.drop(h)))

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """A trivial split: one stage, ``encode``, the whole encoder; see :mod:`mmbalance.models.stages`."""
        return [("encode", self)]

    def stage_channels(self) -> Dict[str, int]:
        return {"encode": self.out_dim}


class GRUEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.proj(h[-1])

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """A trivial split: one stage, ``encode``, the whole encoder (its intermediate tensors are
        sequences, not channel maps); see :mod:`mmbalance.models.stages`."""
        return [("encode", self)]

    def stage_channels(self) -> Dict[str, int]:
        return {"encode": self.out_dim}


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 128 channels) with 2x2 max-pools, global average pool."""

    def __init__(self, in_channels: int, out_dim: int):
        super().__init__()
        chans = (32, 64, 128)
        blocks, c = [], in_channels
        for k in chans:
            blocks += [nn.Conv2d(c, k, 3, padding=1, bias=False), nn.BatchNorm2d(k), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            c = k
        self.features = nn.Sequential(*blocks)
        self.proj = nn.Linear(c, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return torch.relu(self.proj(h))

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """``block1``..``block3`` (conv, BN, ReLU, max-pool each) and ``pool`` (global average pool,
        linear, ReLU); composed they are :meth:`forward` (see :mod:`mmbalance.models.stages`)."""
        f = self.features
        return [("block1", f[0:4]), ("block2", f[4:8]), ("block3", f[8:12]), ("pool", _PoolProject(self.proj))]

    def stage_channels(self) -> Dict[str, int]:
        """Channels of the feature maps ``[B, C, h, w]`` after the conv blocks."""
        return {f"block{i + 1}": self.features[4 * i].out_channels for i in range(3)}


class _PoolProject(nn.Module):
    """SmallCNN's last stage: ``relu(proj(flatten(avgpool(x))))`` (holds the encoder's ``proj``)."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.proj(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


class FrameEncoder(nn.Module):
    """[B, T, C, H, W] -> per-frame image encoder on [B*T, C, H, W] -> mean over T (OGM-GE pools
    the trunk's [B, 512, T, h, w] map over T, h and w at once; with equal-size frames that is the
    mean of the per-frame pooled features, which is what this computes)."""

    def __init__(self, frame_encoder: nn.Module):
        super().__init__()
        self.frame = frame_encoder
        self.out_dim = frame_encoder.out_dim

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        z = self.frame(x.reshape(b * t, *x.shape[2:]))
        return z.view(b, t, -1).mean(dim=1)

    #: stage outputs are ``[B, T, C, ...]``: the channel axis is 2
    stage_channel_dim = 2

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """The frame encoder's stages applied per frame (``[B, T, ...]`` in and out), then
        ``frame_mean`` (mean over T); composed they are :meth:`forward`."""
        from .stages import encoder_stages
        inner = encoder_stages(self.frame, "frames")
        return [(name, _Framewise(stage)) for name, stage in inner] + [("frame_mean", _FrameMean())]

    def stage_channels(self) -> Dict[str, int]:
        from .stages import stage_channels
        return stage_channels(self.frame, "frames")


class _Framewise(nn.Module):
    """Run ``stage`` on ``[B*T, ...]`` and give back ``[B, T, ...]``."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        z = self.stage(x.reshape(b * t, *x.shape[2:]))
        return z.view(b, t, *z.shape[1:])


class _FrameMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1).mean(dim=1)


def build_encoder(shape: Sequence[int], kind: str = "auto", *, feature_dim: int = 64, hidden_dim: int = 128,
                  dropout: float = 0.0, small_input: bool = False, modality: str = "?") -> nn.Module:
    """Build the encoder for one modality from its per-sample ``shape``."""
    shape = tuple(int(s) for s in shape)
    if isinstance(kind, str) and (kind == "text" or kind.startswith("text:") or kind.startswith("hf:")):
        return build_text_encoder(shape, kind, feature_dim=feature_dim, hidden_dim=hidden_dim, dropout=dropout,
                                  modality=modality)
    if kind not in ENCODER_NAMES:
        from ..registry import suggest
        raise ConfigError(f"unknown encoder '{kind}' for modality '{modality}'.{suggest(kind, list(ENCODER_NAMES))} "
                          f"Choose from {', '.join(ENCODER_NAMES)}")
    nd = len(shape)
    allowed = {1: ("mlp",), 2: ("transformer", "gru", "tcn"), 3: ("cnn", "resnet18"), 4: ("cnn", "resnet18")}
    if nd not in allowed:
        raise ConfigError(f"modality '{modality}': per-sample input shape {list(shape)} is not supported; expected "
                          "[D] (vector), [T, D] (sequence), [C, H, W] (image) or [T, C, H, W] (frames)")
    if kind == "auto":
        kind = "tcn" if nd == 2 and shape[1] <= TCN_MAX_CHANNELS else allowed[nd][0]
    if kind not in allowed[nd]:
        raise ConfigError(f"modality '{modality}': encoder '{kind}' does not fit input shape {list(shape)}; "
                          f"use one of {', '.join(allowed[nd])}")
    if kind == "mlp":
        return MLPEncoder(shape[0], hidden_dim, feature_dim, dropout)
    if kind == "transformer":
        return TransformerEncoder(shape[1], shape[0], hidden_dim, feature_dim, dropout)
    if kind == "gru":
        return GRUEncoder(shape[1], hidden_dim, feature_dim)
    if kind == "tcn":
        return TCNEncoder(shape[1], feature_dim, dropout)
    channels = shape[-3]
    if channels not in (1, 2, 3) and kind == "resnet18":
        raise ConfigError(f"modality '{modality}': ResNet-18 takes 1, 2 or 3 channels, got {channels}")
    img: nn.Module = SmallCNN(channels, feature_dim) if kind == "cnn" else ResNet18Encoder(channels, small_input)
    return FrameEncoder(img) if nd == 4 else img


# ------------------------------------------------------------------------------------------ text
class TextEncoder(nn.Module):
    """[B, L] int64 token ids -> embedding + learned positions -> transformer layers with a padding
    mask -> mean over the non-padding positions -> linear to ``out_dim``."""

    def __init__(self, vocab_size: int, seq_len: int, hidden: int, out_dim: int, dropout: float = 0.0,
                 layers: int = 2, heads: int = 4, pad_id: int = 0):
        super().__init__()
        self.pad_id = int(pad_id)
        self.vocab_size = int(vocab_size)
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=self.pad_id)
        self.core = _TransformerCore(seq_len, hidden, out_dim, dropout, layers, heads)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        pad = x == self.pad_id
        pad[:, 0] &= ~pad.all(dim=1)  # an all-padding row attends to its first position (no NaN)
        return self.core(self.embed(x), pad)

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """A trivial split: one stage, ``encode``, the whole encoder (its intermediate tensors are
        sequences, not channel maps); see :mod:`mmbalance.models.stages`."""
        return [("encode", self)]

    def stage_channels(self) -> Dict[str, int]:
        return {"encode": self.out_dim}


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder loaded from a local folder; the feature is the first ([CLS]) token of
    the last hidden state. The attention mask is ``ids != pad_token_id``."""

    def __init__(self, path: str):
        super().__init__()
        from ..data.text import check_local_model_dir, import_transformers
        p = check_local_model_dir(path, "Hugging Face text encoder")
        tf = import_transformers("the Hugging Face text encoder 'hf:...'")
        try:
            self.model = tf.AutoModel.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"could not load a Hugging Face model from '{p}': {exc}") from None
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.out_dim = int(self.model.config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        out = self.model(input_ids=x, attention_mask=(x != self.pad_id).long())
        return out.last_hidden_state[:, 0]

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """A trivial split: one stage, ``encode``, the whole encoder (its intermediate tensors are
        sequences, not channel maps); see :mod:`mmbalance.models.stages`."""
        return [("encode", self)]

    def stage_channels(self) -> Dict[str, int]:
        return {"encode": self.out_dim}


def build_text_encoder(shape: Tuple[int, ...], kind: str, *, feature_dim: int = 64, hidden_dim: int = 128,
                       dropout: float = 0.0, modality: str = "?") -> nn.Module:
    if len(shape) != 1:
        raise ConfigError(f"modality '{modality}': text encoder '{kind}' takes token ids [L], got input shape {list(shape)}")
    if kind.startswith("hf:"):
        return HFTextEncoder(kind[3:])
    vocab = kind.split(":", 1)[1] if ":" in kind else ""
    if not vocab.isdigit() or int(vocab) < 2:
        raise ConfigError(f"modality '{modality}': encoder '{kind}' needs the vocabulary size, as 'text:<V>' "
                          "(datasets with token ids set it themselves under model.encoder=auto)")
    return TextEncoder(int(vocab), shape[0], hidden_dim, feature_dim, dropout)
