"""CIFAR-10 ResNets of He et al. 2016, "Deep Residual Learning for Image Recognition", sec. 4.2.

Depth 6n+2 (20, 32, 44, 56, ...): a 3x3 stem with 16 channels, three stages of n basic blocks
with 16, 32 and 64 channels, global average pooling and a linear classifier. Shortcuts are
"option A": identity, and on downsampling a stride-2 subsampling with zero-padded channels, so
shortcuts have no parameters. Layer names match the checkpoints of akamaster/pytorch_resnet_cifar10
(`conv1`, `bn1`, `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`, `linear`).
"""

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A downsampling shortcut: keep every second pixel, zero-pad the new channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample by 2 in H and W and pad `extra_channels` zero channels (half each side)."""
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a parameter-free shortcut around them."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = PadShortcut(channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs.

    Args:
        depth: 20, 32, 44, 56, 110, ... (any 6n+2).
        num_classes: number of outputs of the final linear layer.

    Example:
        >>> model = CifarResNet(20)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, blocks, stride=1)
        self.layer2 = _stage(16, 32, blocks, stride=2)
        self.layer3 = _stage(32, 64, blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)  # as in the reference training code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W] (normalised)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` basic blocks; only the first one changes resolution and width."""
    layers = [BasicBlock(in_channels, channels, stride)]
    layers += [BasicBlock(channels, channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
