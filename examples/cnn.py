"""A small CNN with BatchNorm and a UniRepLKNet-style dilated re-parameterization block.

`rewrite optimize examples/cnn.py:build --passes fold-bn,reparam -o out/` runs on it; `build()` returns
(model, example_inputs) so no input file is needed. Weights are random but BatchNorm statistics are
set to non-trivial values, so folding is really exercised.
"""
import torch
from torch import nn


class DilatedReparamBlock(nn.Module):
    """Parallel depthwise convs (7x7, 5x5 dilated 2, 3x3 dilated 3), each with its own BatchNorm, summed."""

    def __init__(self, channels: int):
        super().__init__()
        specs = [(7, 1), (5, 2), (3, 3)]
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=d * (k - 1) // 2, dilation=d,
                                             groups=channels, bias=False) for k, d in specs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in specs)

    def forward(self, x):
        out = self.bns[0](self.convs[0](x))
        for conv, bn in zip(self.convs[1:], self.bns[1:]):
            out = out + bn(conv(x))
        return out


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.block1 = DilatedReparamBlock(width)
        self.mix1 = nn.Sequential(nn.Conv2d(width, width * 2, 1), nn.BatchNorm2d(width * 2), nn.GELU())
        self.down = nn.Sequential(nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(width * 2), nn.GELU())
        self.block2 = DilatedReparamBlock(width * 2)
        self.head = nn.Linear(width * 2, classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.mix1(self.block1(x) + x)
        x = self.down(x)
        x = self.block2(x) + x
        return self.head(x.mean((2, 3)))


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def build():
    """(model, example_inputs) for `rewrite optimize examples/cnn.py:build`."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    _randomize_batchnorm(model)
    return model, (torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
