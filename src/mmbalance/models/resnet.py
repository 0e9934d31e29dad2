"""ResNet-18 in plain torch (no torchvision), as used by OGM-GE and the seed papers.

Encoder only (no final FC): returns the spatial feature map; :class:`ResNet18Encoder` pools it to
a 512-d vector. 1, 2 or 3 input channels (audio spectrogram, optical flow u/v, RGB).
``small_input=True`` swaps the 7x7/stride-2 stem and max-pool for a 3x3/stride-1 stem (CIFAR
style), for 28-112 px inputs on CPU.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """conv1 -> bn -> relu -> maxpool -> layer1..4; output [B, 512, H/32, W/32]."""

    out_channels = 512

    def __init__(self, in_channels: int = 3, small_input: bool = False):
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        inplanes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        ogm_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNet18Encoder(nn.Module):
    """[B, C, H, W] -> [B, 512] (adaptive average pool of the trunk)."""

    def __init__(self, in_channels: int = 3, small_input: bool = False):
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels, small_input)
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.trunk(x), 1), 1)

    def stages(self) -> List[Tuple[str, nn.Module]]:
        """``stem`` (conv1, bn, relu, maxpool), ``layer1``..``layer4``, ``pool`` (global average
        pool, flatten): applied in order they compute :meth:`forward` exactly (the same modules,
        not copies). See :mod:`mmbalance.models.stages`."""
        t = self.trunk
        return [("stem", nn.Sequential(t.conv1, t.bn1, t.relu, t.maxpool)), ("layer1", t.layer1),
                ("layer2", t.layer2), ("layer3", t.layer3), ("layer4", t.layer4), ("pool", GlobalAvgPool())]

    def stage_channels(self) -> Dict[str, int]:
        """Channels of the feature maps ``[B, C, h, w]`` after the stages where a cross-modal block
        may go (the residual stages)."""
        return {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


class GlobalAvgPool(nn.Module):
    """``[B, C, h, w] -> [B, C]``: adaptive average pool to 1x1, flattened."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def ogm_init(module: nn.Module) -> None:
    """OGM-GE's ``weight_init``: Linear Xavier-normal (bias 0), Conv2d Kaiming-normal
    (fan_out, relu), BatchNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
