"""Encoders, picked from the per-sample input shape.

==================  ===========================================  ==================
per-sample shape    encoder (``model.encoder=auto``)              alternatives
==================  ===========================================  ==================
[D]                 :class:`MLPEncoder`                           -
[T, D]              :class:`TransformerEncoder`                   ``gru``
[C, H, W]           :class:`SmallCNN`                             ``resnet18``
[T, C, H, W]        :class:`FrameEncoder` (per-frame CNN, mean)   ``resnet18``
==================  ===========================================  ==================
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .resnet import ResNet18Encoder

ENCODER_NAMES = ("auto", "mlp", "transformer", "gru", "cnn", "resnet18")


class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerEncoder(nn.Module):
    """[B, T, D] -> linear embedding + learned positions -> 2 transformer layers -> mean over T."""

    def __init__(self, in_dim: int, seq_len: int, hidden: int, out_dim: int, dropout: float = 0.0,
                 layers: int = 2, heads: int = 4):
        super().__init__()
        if hidden % heads:
            heads = 1
        self.embed = nn.Linear(in_dim, hidden)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, hidden))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        return self.proj(self.encoder(h).mean(dim=1))


class GRUEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.proj(h[-1])


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


def build_encoder(shape: Sequence[int], kind: str = "auto", *, feature_dim: int = 64, hidden_dim: int = 128,
                  dropout: float = 0.0, small_input: bool = False, modality: str = "?") -> nn.Module:
    """Build the encoder for one modality from its per-sample ``shape``."""
    shape = tuple(int(s) for s in shape)
    if kind not in ENCODER_NAMES:
        from ..registry import suggest
        raise ConfigError(f"unknown encoder '{kind}' for modality '{modality}'.{suggest(kind, list(ENCODER_NAMES))} "
                          f"Choose from {', '.join(ENCODER_NAMES)}")
    nd = len(shape)
    allowed = {1: ("mlp",), 2: ("transformer", "gru"), 3: ("cnn", "resnet18"), 4: ("cnn", "resnet18")}
    if nd not in allowed:
        raise ConfigError(f"modality '{modality}': per-sample input shape {list(shape)} is not supported; expected "
                          "[D] (vector), [T, D] (sequence), [C, H, W] (image) or [T, C, H, W] (frames)")
    if kind == "auto":
        kind = allowed[nd][0]
    if kind not in allowed[nd]:
        raise ConfigError(f"modality '{modality}': encoder '{kind}' does not fit input shape {list(shape)}; "
                          f"use one of {', '.join(allowed[nd])}")
    if kind == "mlp":
        return MLPEncoder(shape[0], hidden_dim, feature_dim, dropout)
    if kind == "transformer":
        return TransformerEncoder(shape[1], shape[0], hidden_dim, feature_dim, dropout)
    if kind == "gru":
        return GRUEncoder(shape[1], hidden_dim, feature_dim)
    channels = shape[-3]
    if channels not in (1, 2, 3) and kind == "resnet18":
        raise ConfigError(f"modality '{modality}': ResNet-18 takes 1, 2 or 3 channels, got {channels}")
    img: nn.Module = SmallCNN(channels, feature_dim) if kind == "cnn" else ResNet18Encoder(channels, small_input)
    return FrameEncoder(img) if nd == 4 else img
