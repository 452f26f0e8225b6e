"""A plain hand-written 2-D Fourier neural operator (Li et al., ICLR 2021), as users write them.

Each layer: y = GELU(W·x + irfft2(R ⊙ rfft2(x)[kept modes])). `build()` returns (model, example_inputs).
"""
import torch
from torch import nn


class SpectralConv2d(nn.Module):
    def __init__(self, channels: int, modes1: int, modes2: int, scale: float | None = None):
        super().__init__()
        self.modes1, self.modes2 = modes1, modes2
        scale = 1 / (channels * channels) if scale is None else scale
        self.w1 = nn.Parameter(scale * torch.randn(channels, channels, modes1, modes2, dtype=torch.cfloat))
        self.w2 = nn.Parameter(scale * torch.randn(channels, channels, modes1, modes2, dtype=torch.cfloat))

    def forward(self, x):
        b, c, h, w = x.shape
        x_ft = torch.fft.rfft2(x)
        out_ft = torch.zeros(b, c, h, w // 2 + 1, dtype=torch.cfloat, device=x.device)
        m1, m2 = self.modes1, self.modes2
        out_ft[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], self.w1)
        out_ft[:, :, -m1:, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], self.w2)
        return torch.fft.irfft2(out_ft, s=(h, w))


class FNO2d(nn.Module):
    def __init__(self, modes: int = 8, width: int = 16, layers: int = 4):
        super().__init__()
        self.lift = nn.Conv2d(1, width, 1)
        self.spectral = nn.ModuleList(SpectralConv2d(width, modes, modes) for _ in range(layers))
        self.skips = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.project = nn.Sequential(nn.Conv2d(width, 64, 1), nn.GELU(), nn.Conv2d(64, 1, 1))

    def forward(self, x):
        x = self.lift(x)
        for i, (spectral, skip) in enumerate(zip(self.spectral, self.skips)):
            x = spectral(x) + skip(x)
            if i < len(self.spectral) - 1:
                x = nn.functional.gelu(x)
        return self.project(x)


def build():
    """(model, example_inputs) for `rewrite optimize examples/fno.py:build`."""
    torch.manual_seed(0)
    return FNO2d().eval(), (torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)),)
