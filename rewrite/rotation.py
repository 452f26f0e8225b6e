"""Randomized Hadamard transforms, shared by `rotate` (the residual stream, offline) and `dgq{hadamard=…}`
(a layer's input, online).

Q = diag(±1)·(R ⊗ H_b), H_b the normalized Hadamard matrix of order b = 64 and R a random orthogonal matrix of
order d/b: orthogonal for any d that 64 divides, and applied to a vector without forming Q, as
x·Q = vec(Rᵀ·X·H_b) with X = x·diag(±1) cut into d/b rows of b, O(d·(b + d/b)) instead of O(d²). Where 64 ∤ d,
b = 1 and R is the whole (dense) random orthogonal Q. QuaRot (Ashkboos et al., arXiv:2404.00456) rotates by
Hadamard matrices so that no channel keeps an outlier for int8 or int4 codes to lose.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64


@dataclass(frozen=True)
class Factors:
    """Q = diag(signs)·(outer ⊗ H_b), all float64."""

    signs: torch.Tensor
    outer: torch.Tensor

    @property
    def block(self) -> int:
        return len(self.signs) // len(self.outer)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·Q along x's last dimension, in x's dtype."""
        return apply(x, *(t.to(x.dtype) for t in (self.signs, self.outer, hadamard(self.block))))

    def dense(self) -> torch.Tensor:
        return self.signs[:, None] * torch.kron(self.outer, hadamard(self.block))


def factors(width: int, seed: int) -> Factors:
    """Q's factors, the same for the same (width, seed)."""
    generator = torch.Generator().manual_seed(seed)
    block = BLOCK if width % BLOCK == 0 else 1
    outer = _random_orthogonal(width // block, generator)
    signs = torch.randint(0, 2, (width,), generator=generator, dtype=torch.float64) * 2 - 1
    return Factors(signs, outer)


def apply(x: torch.Tensor, signs: torch.Tensor, outer: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x·Q along x's last dimension, in x's dtype (the factors as tensors, so that export sees buffers)."""
    m, b = len(outer), len(block)
    y = (x * signs).reshape(*x.shape[:-1], m, b) @ block
    return (outer.T @ y).reshape(x.shape)


def hadamard(n: int) -> torch.Tensor:
    """The normalized Hadamard matrix of order n (a power of two), float64: symmetric and orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n ** 0.5


def _random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()
