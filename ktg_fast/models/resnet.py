"""CIFAR ResNet (He et al. 2016, Section 4.2) with parameter-free option-A shortcuts.

Depth 6n+2: a 3x3 stem conv, three stages of n BasicBlocks at 16/32/64
channels (stride 2 at the start of stages 2 and 3), global average pooling and
a linear classifier.  The forward pass is functional (no in-place ops on
activations, no data-dependent control flow) so ``torch.func.vmap`` can run a
stack of copies at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "init_weights", "resnet_blocks_per_stage"]


def init_weights(model: nn.Module, *, kaiming_linear: bool) -> None:
    """Initialise as the authors' code does.

    Conv weights ~ N(0, sqrt(2 / (kh * kw * out_channels))), conv biases 0,
    BatchNorm weight 1 and bias 0, Linear bias 0; the Linear weight is
    Kaiming-normal when ``kaiming_linear`` (ResNet) and PyTorch's default
    otherwise (Wide ResNet).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if kaiming_linear:
                nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


def resnet_blocks_per_stage(depth: int) -> int:
    """Blocks per stage n of a CIFAR ResNet of ``depth`` = 6n+2 layers (n >= 1)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}"
        )
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a parameter-free (option A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # extra channels of zeros on the shortcut

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, subsampled by the stride and zero-padded in channels when the shape changes."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            lo = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; any input size and channel count.

    Args:
        depth: number of weighted layers, 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: size of the classifier output.
        in_channels: channels of the input images (3 for RGB, 1 for grayscale).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        n = resnet_blocks_per_stage(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, kaiming_linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to logits (B, num_classes)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
