"""Wide ResNet d-k (Zagoruyko & Komodakis 2016) with pre-activation blocks.

Depth d = 6n+4: a 3x3 stem conv to 16 channels, three stages of n blocks at
16k/32k/64k channels (stride 2 at the start of stages 2 and 3), a final
BN-ReLU, global average pooling and a linear classifier.  Blocks are
BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, with a 1x1 conv shortcut where the
shape changes.  Functional forward, safe under ``torch.func.vmap``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import init_weights

__all__ = ["WideBlock", "WideResNet", "wrn_blocks_per_stage"]


def wrn_blocks_per_stage(depth: int, widen_factor: int) -> int:
    """Blocks per stage n of a WRN of ``depth`` = 6n+4 (n >= 1) and width ``widen_factor`` >= 1."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"Wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
        )
    if widen_factor < 1:
        raise ValueError(f"Wide ResNet widen factor k must be >= 1, got {widen_factor}")
    return (depth - 4) // 6


class WideBlock(nn.Module):
    """Pre-activation block; a 1x1 conv shortcut when channels or stride change."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
            if in_planes != planes or stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        # The projection sees the pre-activated input; the identity sees x itself.
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-d-k for small images; any input size and channel count.

    Args:
        depth: 6n+4 (10, 16, 22, 28, 40, ...).
        widen_factor: k, the width multiplier of the three stages.
        num_classes: size of the classifier output.
        in_channels: channels of the input images.
        dropout: dropout probability between the two convs of a block (0 in the paper).
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = wrn_blocks_per_stage(depth, widen_factor)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.depth, self.widen_factor = depth, widen_factor
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 16
        for i, planes in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self, kaiming_linear=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to logits (B, num_classes)."""
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
