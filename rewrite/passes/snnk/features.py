"""Random-feature maps Φ (inputs) and Ψ (weights) that share one seeded random matrix G.

Each map gives an unbiased estimate E_G[Ψ(w̃)·Φ(x̃)] = k(w̃, x̃) of a kernel in z = w̃ᵀx̃ (x̃ = [x; 1],
w̃ = [w; b], so z is the first Linear's pre-activation):

- relu (Cho & Saul 2009): Φ = ReLU(Gx̃)/√m; k = ‖w̃‖‖x̃‖(sin θ + (π − θ) cos θ)/(2π), the order-1 arc-cosine
  kernel: a different function from ReLU(z), which recovery trains toward (the paper's use).
- exp (the Gaussian trick, positive features): Φ = exp(Gx̃ − ‖x̃‖²/2)/√m, Ψ = exp(Gw̃ − ‖w̃‖²/2)/√m;
  k = exp(z) exactly in expectation.
- fourier (sin, cos; universal random features with a = i, b = 1 in the Gaussian trick):
  e^{iz} = E_g[exp(i gᵀx̃ + ‖x̃‖²/2) · exp(gᵀw̃ − ‖w̃‖²/2)], so Φ = e^{‖x̃‖²/2}[cos Gx̃; sin Gx̃]/√m (real
  pairs, 2m features, ONNX-exportable) and Ψ puts exp(Gw̃ − ‖w̃‖²/2)/√m on the cos half (cos z) or the sin
  half (sin z). Unbiased, but its variance grows like e^{‖x̃‖² + ‖w̃‖²}: usable for small-norm layers only.
- series (GELU, tanh, sigmoid, SiLU; random Maclaurin features, Kar & Karnick 2012): f ≈ p(z) = Σₙ aₙzⁿ,
  the least-squares polynomial of degree D on [−r, r]; zⁿ = E[Πₖ (gₖᵀw̃)(gₖᵀx̃)] over independent Gaussian
  rows gₖ, so the m features are split between degrees 1..D (and one constant feature for a₀):
  Φₙ = Πₖ₌₁ⁿ Gₙₖx̃/√mₙ, Ψₙ = aₙ Πₖ Gₙₖw̃/√mₙ. Exact in expectation for p, an approximation of f outside
  [−r, r] (pretrained pre-activations often leave it): recovery is needed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("relu", "exp", "fourier", "series")


def random_features(m: int, dim: int, orthogonal: bool, seed: int) -> torch.Tensor:
    """G ∈ R^{m×dim}, rows N(0, I); orthogonal: blocks of orthonormal rows rescaled by chi(dim) norms
    (same marginals, lower variance)."""
    gen = torch.Generator().manual_seed(seed)
    if not orthogonal:
        return torch.randn(m, dim, generator=gen)
    blocks = []
    for _ in range(math.ceil(m / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed, unbiased rows
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, dim, generator=gen).norm(dim=1, keepdim=True)
    return rows * norms


def relu_features(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Φ(z) = ReLU(G z̃)/√m for z of shape (..., d), z̃ = [z; 1]."""
    return torch.relu(z @ g[:, :-1].T + g[:, -1]) / math.sqrt(g.shape[0])


def series_coefficients(fn, degree: int, radius: float) -> list[float]:
    """a₀..a_D of the least-squares polynomial fit of `fn` on [−radius, radius]."""
    z = torch.linspace(-radius, radius, 513, dtype=torch.float64)
    vander = torch.stack([z ** n for n in range(degree + 1)], 1)
    return torch.linalg.lstsq(vander, fn(z)[:, None]).solution[:, 0].tolist()


class FeatureMap(nn.Module):
    """Φ as a module (G stored as buffers, never trained) and Ψ(W̃) for initializing the weight side."""

    def __init__(self, kind: str, g: torch.Tensor, coefficients: list[float] | None = None, sin: bool = False):
        super().__init__()
        self.kind, self.sin, self.m = kind, sin, g.shape[0]
        self.register_buffer("g_weight", g[:, :-1].contiguous())
        self.register_buffer("g_bias", g[:, -1].contiguous())
        self.coefficients = list(coefficients or [])
        self.degree_rows = _split_rows(self.m, len(self.coefficients) - 1) if kind == "series" else []

    @property
    def width(self) -> int:
        """Number of features Φ(x) has."""
        return {"fourier": 2 * self.m, "series": 1 + sum(self.degree_rows)}.get(self.kind, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = nn.functional.linear(x, self.g_weight, self.g_bias)  # G x̃
        if self.kind == "relu":
            return torch.relu(proj) / math.sqrt(self.m)
        sq = (x * x).sum(-1, keepdim=True) + 1  # ‖x̃‖²
        if self.kind == "exp":
            return torch.exp(proj - sq / 2) / math.sqrt(self.m)
        if self.kind == "fourier":
            return torch.exp(sq / 2) * torch.cat([torch.cos(proj), torch.sin(proj)], -1) / math.sqrt(self.m)
        return self._series(proj, torch.ones_like(sq))

    def psi(self, w_tilde: torch.Tensor) -> torch.Tensor:
        """Ψ(w̃ⱼ) for every row of W̃ (l × (d+1)) with the same G: an (l × width) matrix."""
        proj = w_tilde @ torch.cat([self.g_weight, self.g_bias[:, None]], 1).T
        if self.kind == "relu":
            return torch.relu(proj) / math.sqrt(self.m)
        pos = torch.exp(proj - (w_tilde * w_tilde).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)
        if self.kind == "exp":
            return pos
        if self.kind == "fourier":
            zero = torch.zeros_like(pos)
            return torch.cat([zero, pos] if self.sin else [pos, zero], -1)
        return self._series(proj, torch.full_like(proj[..., :1], self.coefficients[0]), weights=True)

    def _series(self, proj: torch.Tensor, constant: torch.Tensor, weights: bool = False) -> torch.Tensor:
        """[constant; Φ₁; …; Φ_D]: degree n uses n·mₙ consecutive rows of G, products over each group of n."""
        parts, start = [constant], 0
        for n, rows in enumerate(self.degree_rows, 1):
            block = proj[..., start:start + n * rows].unflatten(-1, (n, rows)).prod(-2) / math.sqrt(rows)
            parts.append(block * self.coefficients[n] if weights else block)
            start += n * rows
        return torch.cat(parts, -1)


def _split_rows(m: int, degree: int) -> list[int]:
    """Features per degree 1..D from m rows of G (degree n spends n rows on each feature)."""
    per = max(1, m // sum(range(1, degree + 1)))
    return [per] * degree


def rows_needed(kind: str, m: int, degree: int) -> int:
    """Rows of G that `m` features of `kind` use."""
    return sum(n * r for n, r in enumerate(_split_rows(m, degree), 1)) if kind == "series" else m
