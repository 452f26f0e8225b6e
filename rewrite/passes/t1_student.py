"""The transform-once student: neuraloperator FNO blocks rewritten to run on the kept Fourier modes.

One forward transform (truncated rFFT, norm="forward") where the blocks begin, every block computed on
the kept coefficients Z, one inverse transform where they end. What carries over from the teacher
exactly (Transform Once, §3): the per-mode weights R, the 1×1 skip W and channel-MLP weights (channel
mixing commutes with the DFT), biases (they live in the DC bin), soft-gating. What changes: the
nonlinearity now acts on a band-limited signal, either
  - "coeff" (T1 style): σ on the coefficients' real and imaginary parts, then a learned mode mixer per
    axis (identity at start), or
  - "pseudo" (pseudo-spectral): inverse to a small grid of ~3/2 the modes, σ there, forward back
    (the truncation is the 2/3-rule dealiasing); its cost does not depend on the input resolution.
and the skip paths no longer carry the frequencies above the kept modes. So the student is approximate
and is distilled toward the teacher (rewrite.recover).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rewrite.passes.spectral import _c2r, _complex_along, _dft, _r2c, from_neuralop


class _Transform(nn.Module):
    """Truncated real DFT (norm="forward") between a grid and the kept frequencies, as matmuls."""

    def __init__(self, freqs: list[list[int]], grid: tuple[int, ...]):
        super().__init__()
        self.d = len(grid)
        for a, (f, n) in enumerate(zip(freqs, grid)):
            last = a == self.d - 1
            self.register_buffer(f"fwd{a}", ((_r2c(f, n) if last else _dft(f, n, -1)) / n).float())
            self.register_buffer(f"inv{a}", ((_c2r(f, n) if last else _dft(f, n, +1, inverse=True)) * n).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = x @ getattr(self, f"fwd{self.d - 1}")
        k = z.shape[-1] // 2
        re, im = z[..., :k], z[..., k:]
        for a in range(self.d - 1):
            re, im = _complex_along(re, im, getattr(self, f"fwd{a}"), 2 + a)
        return re, im

    def inverse(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        for a in range(self.d - 1):
            re, im = _complex_along(re, im, getattr(self, f"inv{a}"), 2 + a)
        return torch.cat([re, im], -1) @ getattr(self, f"inv{self.d - 1}")


def _channels(w: torch.Tensor, re: torch.Tensor, im: torch.Tensor):
    """1×1 channel mixing commutes with the DFT."""
    return torch.einsum("oi,bi...->bo...", w, re), torch.einsum("oi,bi...->bo...", w, im)


class T1Blocks(nn.Module):
    """Replaces neuraloperator's FNOBlocks (all layers): space → kept modes → blocks → space."""

    def __init__(self, blocks: nn.Module, grid: tuple[int, ...], nonlinearity: str,
                 keep: list[list[int]] | None = None):
        super().__init__()
        weights, biases, freqs = student_weights(blocks, grid)
        if keep is not None:  # a subset of the teacher's modes (frequency selection)
            freqs = [[f[i] for i in idx] for f, idx in zip(freqs, keep)]
            index = tuple(torch.tensor(idx)[tuple(slice(None) if b == a else None for b in range(len(keep)))]
                          for a, idx in enumerate(keep))
            weights = [w[(slice(None), slice(None)) + index] for w in weights]
        dc = torch.zeros([len(f) for f in freqs])
        dc[tuple(f.index(0) for f in freqs)] = 1.0  # a constant (bias) lives only in the DC bin
        self.register_buffer("dc", dc)
        self.spectral_b = nn.ParameterList(nn.Parameter(b.clone() if b is not None else torch.zeros(w.shape[1]))
                                           for w, b in zip(weights, biases))
        self.n_layers, self.nonlinearity, self.grid = blocks.n_layers, nonlinearity, tuple(grid)
        self.transform = _Transform(freqs, grid)
        small = tuple(max(3, math.ceil(1.5 * (2 * len(f) - 1 if a == len(freqs) - 1 else len(f))))
                      for a, f in enumerate(freqs))
        self.small = _Transform(freqs, small)
        modes = [len(f) for f in freqs]
        self.spectral_re = nn.ParameterList(nn.Parameter(w.real.float().clone()) for w in weights)
        self.spectral_im = nn.ParameterList(nn.Parameter(w.imag.float().clone()) for w in weights)
        self.skip = nn.ParameterList(nn.Parameter(s.conv.weight.detach()[..., 0].clone()) for s in blocks.fno_skips)
        self.mlp_w = nn.ParameterList(nn.Parameter(fc.weight.detach()[..., 0].clone())
                                      for mlp in blocks.channel_mlp for fc in mlp.fcs)
        self.mlp_b = nn.ParameterList(nn.Parameter(fc.bias.detach().clone()) for mlp in blocks.channel_mlp for fc in mlp.fcs)
        self.gate = nn.ParameterList(nn.Parameter(g.weight.detach().reshape(-1).clone()) for g in blocks.channel_mlp_skips)
        mixers = [nn.Parameter(torch.eye(m)) for _ in range(blocks.n_layers * 2) for m in modes]
        self.mixers = nn.ParameterList(mixers if nonlinearity == "coeff" else [])
        self.modes = modes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.grid:
            raise ValueError(f"this t1 model was built for grid {self.grid}, got {tuple(x.shape[2:])}")
        re, im = self.transform(x)
        for i in range(self.n_layers):
            re, im = self._block(i, re, im)
        return self.transform.inverse(re, im)

    def _block(self, i: int, re: torch.Tensor, im: torch.Tensor):
        last = i == self.n_layers - 1
        sr, si = _per_mode(self.spectral_re[i], self.spectral_im[i], re, im)
        kr, ki = _channels(self.skip[i], re, im)
        yr, yi = sr + kr + self._bias(self.spectral_b[i]), si + ki
        if not last:
            yr, yi = self._sigma(2 * i, yr, yi)
        hr, hi = _channels(self.mlp_w[2 * i], yr, yi)
        hr, hi = self._sigma(2 * i, hr + self._bias(self.mlp_b[2 * i]), hi, mix=False)
        hr, hi = _channels(self.mlp_w[2 * i + 1], hr, hi)
        hr = hr + self._bias(self.mlp_b[2 * i + 1])
        g = self.gate[i].reshape(1, -1, *[1] * (re.dim() - 2))
        yr, yi = hr + g * re, hi + g * im
        if not last:
            yr, yi = self._sigma(2 * i + 1, yr, yi)
        return yr, yi

    def _bias(self, b: torch.Tensor) -> torch.Tensor:
        return b.reshape(1, -1, *[1] * self.dc.dim()) * self.dc

    def _sigma(self, k: int, re: torch.Tensor, im: torch.Tensor, mix: bool = True):
        if self.nonlinearity == "pseudo":
            return self.small(F.gelu(self.small.inverse(re, im)))
        re, im = F.gelu(re), F.gelu(im)
        if mix:
            for a in range(len(self.modes)):
                m = self.mixers[k * len(self.modes) + a]
                re = torch.movedim(torch.movedim(re, 2 + a, -1) @ m.T, -1, 2 + a)
                im = torch.movedim(torch.movedim(im, 2 + a, -1) @ m.T, -1, 2 + a)
        return re, im


def _per_mode(wr: torch.Tensor, wi: torch.Tensor, re: torch.Tensor, im: torch.Tensor):
    """Y_k = Σ_i Z_k[i]·R_k[i, o] for complex R (stored as (Cin, Cout, modes…) real/imag)."""
    yr = torch.einsum("bi...,io...->bo...", re, wr) - torch.einsum("bi...,io...->bo...", im, wi)
    yi = torch.einsum("bi...,io...->bo...", re, wi) + torch.einsum("bi...,io...->bo...", im, wr)
    return yr, yi


def why_not(blocks: nn.Module) -> str | None:
    """The FNOBlocks configurations the student reproduces (the neuraloperator defaults)."""
    checks = [
        (type(blocks).__name__ == "FNOBlocks", "not a neuraloperator FNOBlocks"),
        (not blocks.preactivation and blocks.norm is None and blocks.stabilizer is None, "norm/preactivation/stabilizer"),
        (blocks.use_channel_mlp and blocks.channel_mlp_skip == "soft-gating" and blocks.fno_skip == "linear",
         "needs linear FNO skips, channel MLPs and soft-gating (the defaults)"),
        (blocks.non_linearity is F.gelu, "needs GELU"),
        (all(len(m.fcs) == 2 for m in blocks.channel_mlp), "needs 2-layer channel MLPs"),
        (all(g.bias is None for g in blocks.channel_mlp_skips), "soft-gating with bias"),
    ]
    return next((why for ok, why in checks if not ok), None)


def student_weights(blocks: nn.Module, grid: tuple[int, ...]):
    """(per-layer complex weights (Cin, Cout, modes…), per-layer spectral biases, kept frequencies)."""
    weights, biases, freqs = [], [], []
    for conv in blocks.convs:
        layer = from_neuralop(conv, grid)
        if isinstance(layer, str):
            raise ValueError(layer)
        w = torch.complex(layer.weight_re.detach(), layer.weight_im.detach()).permute(1, 2, 0)
        weights.append(w.reshape(*w.shape[:2], *layer.modes))
        biases.append(None if layer.bias is None else layer.bias.reshape(-1))
        freqs = layer.in_freqs
    return weights, biases, freqs


def select_modes(freqs: list[list[int]], x: torch.Tensor, ratio: float, how: str) -> list[list[int]]:
    """Per axis, indices of the `ratio` share of the kept frequencies to keep: the lowest |f|, or those
    carrying the most energy of the blocks' input `x` (B, C, *grid) on calibration data. DC always stays."""
    d = x.dim() - 2
    spectrum = torch.fft.rfftn(x.double(), dim=tuple(range(2, 2 + d))).abs().square().sum(dim=(0, 1))
    chosen = []
    for a, f in enumerate(freqs):
        count = max(1, round(ratio * len(f)))
        if how == "energy":
            bins = torch.tensor([v % spectrum.shape[a] for v in f])
            marginal = spectrum.sum(dim=tuple(b for b in range(d) if b != a))[bins]
            order = sorted(range(len(f)), key=lambda i: (f[i] != 0, -float(marginal[i])))
        else:
            order = sorted(range(len(f)), key=lambda i: (abs(f[i]), f[i]))
        chosen.append(sorted(order[:count]))
    return chosen
