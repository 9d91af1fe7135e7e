"""BiSeNet face parser (19 CelebAMask-HQ classes), weight-compatible with ``79999_iter.pth``.

Contract:
- ``BiSeNet(n_classes=19, width=64)``: the architecture of zllrunning/face-parsing.PyTorch as
  vendored by MuseTalk (ResNet-18 context path; the spatial path is replaced by the 1/8
  ResNet features). Parameter names equal the official checkpoint's keys
  (``cp.resnet.*``, ``cp.arm16.*``, ``cp.arm32.*``, ``cp.conv_head16/32.*``, ``cp.conv_avg.*``,
  ``ffm.*``, ``conv_out.*``, ``conv_out16.*``, ``conv_out32.*``), so the file loads strictly.
  ``width`` is the ResNet stem width (64 official); every other channel count scales with it,
  so narrow random test models use the same code.
- ``forward(x [B,3,H,W] ImageNet-normalised RGB) -> logits [B,n_classes,H,W]``: only the main
  head, upsampled bilinearly (``align_corners=True``) to the input size. The two auxiliary
  heads exist only so the checkpoint loads strictly; they are never run.
- ``BiSeNet.from_state_dict_shapes(sd)`` infers ``width``/``n_classes`` from a state dict.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the projection shortcut is ``downsample.0`` (conv) / ``downsample.1`` (BN)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18Trunk(nn.Module):
    """ResNet-18 without the classifier; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(w, w, 1)
        self.layer2 = _stage(w, 2 * w, 2)
        self.layer3 = _stage(2 * w, 4 * w, 2)
        self.layer4 = _stage(4 * w, 8 * w, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        f8 = self.layer2(x)
        f16 = self.layer3(f8)
        f32 = self.layer4(f16)
        return f8, f16, f32


class AttentionRefinement(nn.Module):
    """Conv block re-weighted per channel by a sigmoid of its global average."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3, 1, 1)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.resnet = ResNet18Trunk(w)
        self.arm16 = AttentionRefinement(4 * w, 2 * w)
        self.arm32 = AttentionRefinement(8 * w, 2 * w)
        self.conv_head32 = ConvBNReLU(2 * w, 2 * w, 3, 1, 1)
        self.conv_head16 = ConvBNReLU(2 * w, 2 * w, 3, 1, 1)
        self.conv_avg = ConvBNReLU(8 * w, 2 * w, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f8, f16, f32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(f32, 1))  # broadcast add == nearest upsample of 1x1
        f32_sum = self.arm32(f32) + avg
        f32_up = self.conv_head32(F.interpolate(f32_sum, size=f16.shape[2:], mode="nearest"))
        f16_sum = self.arm16(f16) + f32_up
        f16_up = self.conv_head16(F.interpolate(f16_sum, size=f8.shape[2:], mode="nearest"))
        return f8, f16_up


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1, 1, 0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class OutputHead(nn.Module):
    def __init__(self, cin: int, cmid: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cmid, 3, 1, 1)
        self.conv_out = nn.Conv2d(cmid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face-parsing network; see the module docstring for the contract."""

    def __init__(self, n_classes: int = 19, width: int = 64) -> None:
        super().__init__()
        w = width
        self.n_classes = n_classes
        self.width = width
        self.cp = ContextPath(w)
        self.ffm = FeatureFusion(4 * w, 4 * w)
        self.conv_out = OutputHead(4 * w, 4 * w, n_classes)
        # Auxiliary training heads: present for strict loading, unused at inference.
        self.conv_out16 = OutputHead(2 * w, w, n_classes)
        self.conv_out32 = OutputHead(2 * w, w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f8, f16_up = self.cp(x)
        logits = self.conv_out(self.ffm(f8, f16_up))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)

    @staticmethod
    def shapes_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """``(n_classes, width)`` read from a checkpoint's tensor shapes (KeyError if absent)."""
        width = int(state_dict["cp.resnet.conv1.weight"].shape[0])
        n_classes = int(state_dict["conv_out.conv_out.weight"].shape[0])
        return n_classes, width
