"""The README's main job: a small Fourier neural operator with a channel-MLP head, trained in seconds.

`rewrite optimize examples/fno_mlp.py:build --passes t1,fwsvd --emit onnx` rewrites it with both: t1 turns
the spectral convolutions into exact truncated-DFT GEMMs (which also makes the FNO exportable to ONNX at
all), and fwsvd factorizes the head's Linears by Fisher-weighted SVD. (dgq applies too, but its per-token
activation quantization costs more than it saves on these narrow layers: the report calls it slower.) `build()` returns (model, example_inputs, calibration): the model is trained for a few seconds on
a generated task, so its weights have the structure trained weights have (random weights are not
low-rank, and compressing them says nothing), and the calibration batches come from the same task.

Task: the solution operator of a nonlinear heat equation on the unit torus, u0 ↦ u(t) + 0.5·u(t)², with
u(t) the heat flow of u0 at t = 0.002, computed exactly in Fourier space. Inputs are random smooth fields.
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from fno import SpectralConv2d  # noqa: E402  (the hand-written FNO layer, shared with examples/fno.py)

GRID = 64
WIDTH = 32


class FNOWithMLPHead(nn.Module):
    def __init__(self, modes: int = 6, width: int = WIDTH, layers: int = 3, hidden: int = 256):
        super().__init__()
        self.lift = nn.Conv2d(1, width, 1)
        self.spectral = nn.ModuleList(SpectralConv2d(width, modes, modes, scale=1 / width) for _ in range(layers))
        self.skips = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        # A per-point channel MLP on a channels-last view, as transformer-style operator heads are written.
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x):
        x = self.lift(x)
        for spectral, skip in zip(self.spectral, self.skips):
            x = nn.functional.gelu(spectral(x) + skip(x))
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def smooth_fields(count: int, gen: torch.Generator, grid: int = GRID) -> torch.Tensor:
    """Random fields with a decaying spectrum (smooth, like PDE initial conditions)."""
    k = torch.fft.fftfreq(grid, 1 / grid)
    decay = (1 + k[:, None] ** 2 + k[None, :] ** 2) ** -1.5
    noise = torch.randn(count, 1, grid, grid, dtype=torch.cfloat, generator=gen)
    field = torch.fft.ifft2(noise * decay).real
    return field / field.std(dim=(2, 3), keepdim=True)


def solve(u0: torch.Tensor, t: float = 0.002) -> torch.Tensor:
    grid = u0.shape[-1]
    k = torch.fft.fftfreq(grid, 1 / grid) * 2 * torch.pi
    heat = torch.exp(-(k[:, None] ** 2 + k[None, :] ** 2) * t)
    ut = torch.fft.ifft2(torch.fft.fft2(u0) * heat).real
    return ut + 0.5 * ut ** 2


def train(model: nn.Module, steps: int = 100, seed: int = 0) -> float:
    """A few seconds of Adam at 16² (an FNO is resolution-independent; it is used at 64²)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = smooth_fields(8, gen, grid=16)
        target = solve(x)
        loss = ((model(x) - target) ** 2).mean() / (target ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def build():
    """(model, example_inputs, calibration batches) for `rewrite optimize examples/fno_mlp.py:build`."""
    torch.manual_seed(0)
    model = FNOWithMLPHead()
    train(model)
    gen = torch.Generator().manual_seed(1)
    calibration = [(smooth_fields(4, gen),) for _ in range(4)]
    return model.eval(), calibration[0], calibration
