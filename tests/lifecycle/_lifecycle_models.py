"""Small PyTorch networks shared by the lifecycle tests."""

from __future__ import annotations

import torch
from torch import nn

import bnkit.torch as bt


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine, so that folding has work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator))
                m.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(c, generator=generator))
    return model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, convention: str = "torch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bt.BatchNorm2d(cout, convention=convention)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """A small ResNet: stem, basic blocks with 1x1 projection shortcuts, pooled linear head."""

    def __init__(self, widths=(16, 32, 64), blocks_per_stage: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(cin, width, stride, convention="keras" if i == 1 else "torch"))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
